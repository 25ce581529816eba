"""Process-wide caches under concurrent use: no lost or corrupt entry, stats that add up."""

from __future__ import annotations

import random
import sys
import threading

import pytest
import torch

from dilexp.cache import build_cache, pattern_nbytes, reset_global_cache

THREADS = 8
OPS_PER_THREAD = 10_000
KEYS = 40
META = torch.device("meta")


def expected(i: int) -> torch.Tensor:
    # Sizes differ per key so byte limits bite unevenly; values identify the key.
    return torch.arange(8 + i, dtype=torch.int64) * (i + 1)


@pytest.fixture(autouse=True)
def _fresh_shared_caches():
    reset_global_cache()
    # A short switch interval interleaves threads inside get_or_build far more often.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)
    reset_global_cache()


def hammer(cache, seed: int, pregen_thread: bool, counts: dict[str, int], errors: list[BaseException],
           start: threading.Barrier) -> None:
    rng = random.Random(seed)
    want = [expected(i) for i in range(KEYS)]
    looked_up = pregen_calls = 0
    start.wait()
    try:
        for _ in range(OPS_PER_THREAD):
            r = rng.random()
            if r < 0.001:
                cache.clear()
                continue
            i = rng.randrange(KEYS)
            device = META if r > 0.9 else "cpu"
            build = lambda i=i: expected(i)  # a fresh build, equal to want[i]
            if pregen_thread and r < 0.02:
                with cache.pregenerating():
                    out = cache.get_or_build(("p", i), build, device)
                pregen_calls += 1
            else:
                out = cache.get_or_build(("p", i), build, device)
                looked_up += 1
            if device is META:
                assert out.device == META and out.shape == want[i].shape
            else:
                assert out.device.type == "cpu" and torch.equal(out, want[i]), f"corrupt entry for key {i}"
    except BaseException as e:  # surfaced by the main thread
        errors.append(e)
    counts[f"lookups{seed}"] = looked_up
    counts[f"pregen{seed}"] = pregen_calls


def check_store(entries: dict, limit_bytes: int, counted_bytes: float) -> None:
    """The stored patterns are intact, and the byte counter matches what is stored."""
    total = 0
    for (key, device), entry in entries.items():
        pattern, nbytes = entry[0], entry[1]
        assert nbytes == pattern_nbytes(pattern)
        if device.type == "cpu":
            assert torch.equal(pattern, expected(key[1]))
        total += nbytes
    assert total == counted_bytes <= limit_bytes


@pytest.mark.parametrize("strategy", ["cpu", "gpu"])
def test_concurrent_get_or_build_and_clear(strategy: str) -> None:
    if strategy == "cpu":
        cache = build_cache("cpu", max_entries=48, max_bytes=8192)
    else:
        cache = build_cache("gpu", hot_max_bytes=2048, max_entries=32, max_bytes=8192, promote_after=2)
    counts: dict[str, int] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)
    threads = [
        # on gpu, thread 0 also pregenerates now and then, which must not disturb the others' counts
        threading.Thread(
            target=hammer, args=(cache, seed, strategy == "gpu" and seed == 0, counts, errors, start)
        )
        for seed in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]

    stats = cache.stats()
    lookups = sum(v for k, v in counts.items() if k.startswith("lookups"))
    pregen_calls = sum(v for k, v in counts.items() if k.startswith("pregen"))
    assert lookups > 0.9 * THREADS * OPS_PER_THREAD
    assert stats["hits"] + stats["misses"] == lookups
    assert stats["hits"] > stats["misses"] > 0 and stats["evictions"] > 0
    assert stats["pregenerated"] <= pregen_calls
    assert stats["entries"] == len(cache.keys())
    if strategy == "cpu":
        check_store(cache._store, 8192, stats["bytes"])
        assert stats["entries"] <= 48
        assert stats["h2d_copies"] > 0  # the meta lookups copy from the host
    else:
        hot = {slot: entry for slot, entry in cache._hot.items()}
        cold = {slot: (e.pattern, e.nbytes) for slot, e in cache._cold.items()}
        assert not hot.keys() & cold.keys()  # the tiers are exclusive
        check_store(hot, 2048, stats["hot_bytes"])
        check_store(cold, 8192, stats["cold_bytes"])
        assert stats["cold_entries"] <= 32
        assert stats["bytes"] == stats["hot_bytes"] + stats["cold_bytes"]
        assert stats["promotions"] > 0 and stats["demotions"] > 0 and pregen_calls > 0

    # after the storm, the cache still works and serves correct values
    cache.clear()
    out = [cache.get_or_build(("p", i), lambda i=i: expected(i), "cpu") for i in range(3)]
    assert all(torch.equal(o, expected(i)) for i, o in enumerate(out))
