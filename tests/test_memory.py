"""Buffer pools (DESIGN section 5) and memory telemetry."""

from __future__ import annotations

import gc
import importlib.util
import random
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dilexp.errors import ConfigError
from dilexp.memory import POOLS, BucketedPool, NoPool, build_pool, parse_bytes
from dilexp.telemetry.memory import memory_snapshot, reset_peak

CONF = Path(__file__).resolve().parents[1] / "conf" / "memory"
META = torch.device("meta")
CPU = torch.device("cpu")
F32 = torch.float32
HAS_CUDA = torch.cuda.is_available()


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def check_books(pool: BucketedPool) -> dict[str, float]:
    """The identities every sequence of calls must keep."""
    s = pool.stats()
    assert s["requests"] == s["reuses"] + s["allocations"]
    assert s["requests"] == s["releases"] + s["dropped"] + s["in_use_buffers"]
    # A reclaimed buffer was counted as dropped when its last tensor died, then came back.
    held_or_gone = (s["in_use_bytes"] + s["pooled_bytes"] + s["evicted_bytes"] + s["cleanup_bytes"]
                    + s["cleared_bytes"] + s["dropped_bytes"] - s["reclaimed_bytes"])
    assert s["allocated_bytes"] == held_or_gone
    assert s["reuse_rate"] == pytest.approx(s["reuses"] / s["requests"] if s["requests"] else 0.0)
    assert s["pooled_bytes"] <= s["peak_pooled_bytes"]
    assert pool.max_bytes is None or s["peak_pooled_bytes"] <= pool.max_bytes
    assert 0 <= s["slack_bytes"] <= s["in_use_bytes"]
    return s


# --------------------------------------------------------------------------- reuse


def test_buffer_is_a_plain_contiguous_tensor_of_the_request() -> None:
    pool = BucketedPool()
    t = pool.empty((3, 5, 7), torch.bfloat16, "cpu")
    assert t.shape == (3, 5, 7) and t.dtype == torch.bfloat16 and t.device == CPU
    assert t.is_contiguous() and t._base is None and not t.requires_grad
    t.fill_(1.5)
    assert bool((t == 1.5).all())
    for shape in [(), (0,), (4, 0, 2), [2, 3], torch.Size([5, 1])]:
        u = pool.empty(shape, F32, CPU)
        assert tuple(u.shape) == tuple(shape)
        pool.release(u)
    assert pool.empty(6, F32, CPU).shape == (6,)


def test_released_buffer_is_reused_within_its_bucket() -> None:
    pool = BucketedPool(growth=2.0)
    a = pool.empty((4, 100), F32, CPU)  # 1600 bytes -> the 2048-byte bucket
    assert pool.bucket_bytes(1600) == 2048
    pa = ptr(a)
    pool.release(a)
    b = pool.empty((1900,), torch.uint8, CPU)  # same bucket, other dtype: not shared
    assert ptr(b) != pa
    c = pool.empty((2, 2, 110), F32, CPU)  # 1760 bytes, same bucket and dtype: reused
    assert ptr(c) == pa and c.shape == (2, 2, 110) and c.is_contiguous() and c._base is None
    pool.release(c)
    d = pool.empty((1000,), F32, CPU)  # 4000 bytes: the next bucket up, a new buffer
    assert ptr(d) != pa
    s = check_books(pool)
    assert (s["requests"], s["reuses"], s["allocations"]) == (4, 1, 3)
    assert s["reuse_rate"] == 0.25


def test_reuse_is_per_device() -> None:
    pool = BucketedPool()
    a = pool.empty((64,), F32, CPU)
    pool.release(a)
    m = pool.empty((64,), F32, "meta")
    assert m.device == META
    assert pool.stats()["reuses"] == 0
    pool.release(m)
    m2 = pool.empty((64,), F32, META)
    c2 = pool.empty((64,), F32, CPU)
    assert m2.device == META and c2.device == CPU
    s = check_books(pool)
    assert s["reuses"] == 2
    pool.cleanup(META)  # only meta's idle buffers go
    pool.release(c2)
    pool.release(m2)
    pool.cleanup("meta")
    assert pool.stats()["pooled_buffers"] == 1


def test_release_accepts_views_and_ignores_double_and_foreign_releases() -> None:
    pool = BucketedPool()
    a = pool.empty((8, 16), F32, CPU)
    pa = ptr(a)
    pool.release(a.t()[2:])  # a view of the handed-out tensor gives the buffer back
    pool.release(a)  # second release of the same buffer: ignored
    pool.release(torch.empty(8, 16))  # never came from the pool: ignored
    s = check_books(pool)
    assert (s["releases"], s["ignored_releases"], s["pooled_buffers"]) == (1, 2, 1)
    b = pool.empty((8, 16), F32, CPU)
    c = pool.empty((8, 16), F32, CPU)
    assert ptr(b) == pa and ptr(c) != pa  # one idle buffer, handed out once


def test_dropped_buffers_are_freed_not_pinned() -> None:
    pool = BucketedPool()
    t = pool.empty((1024,), F32, CPU)
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None
    s = check_books(pool)
    assert (s["dropped"], s["in_use_buffers"], s["in_use_bytes"]) == (1, 0, 0)


def test_handed_out_tensor_is_not_an_autograd_view_of_the_pool() -> None:
    pool = BucketedPool()
    x = torch.randn(4, 3, requires_grad=True)
    out = pool.empty((4, 6), F32, CPU)
    out[:, :3].copy_(x)
    out[:, 3:].zero_()
    assert type(out.grad_fn).__name__ == "CopySlices"
    (out * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((4, 3), 2.0))
    pool.release(out)
    again = pool.empty((4, 6), F32, CPU)
    assert again.grad_fn is None and not again.requires_grad


def test_inference_mode_buffers_stay_in_inference_mode() -> None:
    pool = BucketedPool()
    with torch.inference_mode():
        t = pool.empty((32,), F32, CPU)
        assert t.is_inference()
        pool.release(t)
    u = pool.empty((32,), F32, CPU)  # training code must not get an inference tensor
    assert not u.is_inference()
    x = torch.randn(32, requires_grad=True)
    (u.copy_(x) * x).sum().backward()
    with torch.inference_mode():
        v = pool.empty((32,), F32, CPU)
    assert ptr(v) == ptr(t)


# --------------------------------------------------------------------------- cap and cleanup


def test_byte_cap_evicts_least_recently_released() -> None:
    pool = BucketedPool(max_bytes=2048, min_bucket_bytes=512)
    bufs = [pool.empty((128,), F32, CPU) for _ in range(5)]  # 512 bytes each
    ptrs = [ptr(b) for b in bufs]
    for b in bufs:
        pool.release(b)
    s = check_books(pool)
    assert (s["pooled_bytes"], s["pooled_buffers"], s["evictions"], s["evicted_bytes"]) == (2048, 4, 1, 512)
    assert s["peak_pooled_bytes"] == 2048
    got = {ptr(pool.empty((128,), F32, CPU)) for _ in range(4)}
    assert got == set(ptrs[1:])  # the first released went first

    big = pool.empty((1024,), F32, CPU)  # 4096 bytes: more than the cap, never kept
    pool.release(big)
    s = check_books(pool)
    assert s["pooled_bytes"] == 0 and s["evictions"] == 2


def test_zero_cap_keeps_nothing_and_no_cap_keeps_everything() -> None:
    zero = BucketedPool(max_bytes=0)
    zero.release(zero.empty((10,), F32, CPU))
    assert zero.stats()["pooled_bytes"] == 0
    nocap = BucketedPool(max_bytes=None)
    ts = [nocap.empty((2**16,), F32, CPU) for _ in range(4)]
    for t in ts:
        nocap.release(t)
    assert check_books(nocap)["pooled_buffers"] == 4


def test_cleanup_under_memory_pressure() -> None:
    pool = BucketedPool(check_every=4, min_free_fraction=0.1)
    ts = [pool.empty((256,), F32, CPU) for _ in range(3)]
    for t in ts:
        pool.release(t)
    assert pool.stats()["pooled_buffers"] == 3
    # A device with plenty of room: nothing happens.
    pool._available_bytes = lambda dev: (90, 100)  # type: ignore[method-assign]
    for _ in range(8):
        pool.release(pool.empty((256,), F32, CPU))
    assert pool.stats()["cleanups"] == 0 and pool.stats()["pooled_buffers"] == 3
    # Under pressure: the next check drops every idle buffer of that device.
    pool._available_bytes = lambda dev: (5, 100)  # type: ignore[method-assign]
    for _ in range(4):
        pool.release(pool.empty((256,), F32, CPU))
    s = check_books(pool)
    assert s["cleanups"] >= 1 and s["cleanup_bytes"] >= 2 * 1024  # the request that checked holds one
    assert s["pooled_buffers"] <= 1


def test_min_free_bytes_threshold() -> None:
    pool = BucketedPool(check_every=1, min_free_fraction=0.0, min_free_bytes="1KiB")
    pool.release(pool.empty((256,), F32, CPU))
    pool._available_bytes = lambda dev: (1000, 10**9)  # type: ignore[method-assign]
    pool.empty((16,), torch.int64, CPU)
    assert pool.stats()["cleanups"] == 1 and pool.stats()["pooled_bytes"] == 0


def test_out_of_memory_retries_after_dropping_idle_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BucketedPool()
    pool.release(pool.empty((4096,), F32, CPU))
    real_empty = torch.empty
    calls = []

    def flaky_empty(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("fake OOM")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", flaky_empty)
    t = pool.empty((8192,), F32, CPU)
    monkeypatch.undo()
    assert t.numel() == 8192 and len(calls) == 2
    s = check_books(pool)
    assert (s["oom_retries"], s["cleanups"], s["pooled_bytes"]) == (1, 1, 0)


def test_clear_drops_idle_buffers_only() -> None:
    pool = BucketedPool()
    keep = pool.empty((100,), F32, CPU)
    pool.release(pool.empty((200,), F32, CPU))
    pool.clear()
    s = check_books(pool)
    assert s["pooled_bytes"] == 0 and s["cleared_bytes"] > 0 and s["cleanups"] == 0
    keep.fill_(3.0)
    pool.release(keep)
    assert pool.stats()["pooled_buffers"] == 1


def test_borrow_releases_on_exit_and_on_error() -> None:
    pool = BucketedPool()
    with pool.borrow((10,), F32, CPU) as t:
        t.zero_()
    with pytest.raises(KeyError), pool.borrow((10,), F32, CPU):
        raise KeyError("boom")
    s = check_books(pool)
    assert (s["releases"], s["reuses"], s["in_use_buffers"]) == (2, 1, 0)


# --------------------------------------------------------------------------- stats and concurrency


@pytest.mark.parametrize("reclaim", [False, True])
def test_stats_add_up_over_a_random_workload(reclaim: bool) -> None:
    rng = random.Random(0)
    pool = BucketedPool(max_bytes="64KiB", growth=1.5, reclaim=reclaim, exact=reclaim)
    live: list[torch.Tensor] = []
    for i in range(600):
        op = rng.random()
        if op < 0.5 or not live:
            shape = (rng.choice([1, 7, 64, 300, 2048, 9000]),)
            dtype = rng.choice([F32, torch.float16, torch.int64])
            live.append(pool.empty(shape, dtype, rng.choice([CPU, META])))
        elif op < 0.9:
            pool.release(live.pop(rng.randrange(len(live))))
        elif op < 0.95:
            live.pop(rng.randrange(len(live)))  # dropped without release
        else:
            pool.release(live[-1])  # double release: ignored later
            pool.release(live.pop())
        if i % 100 == 0:
            check_books(pool)
    gc.collect()
    s = check_books(pool)
    assert s["reuses"] > 0 and s["evictions"] > 0 and s["dropped"] > 0 and s["ignored_releases"] > 0
    assert s["in_use_buffers"] == len(live)
    assert set(s) >= {"requests", "reuses", "reuse_rate", "pooled_bytes", "in_use_bytes",
                      "peak_pooled_bytes", "evictions", "cleanups"}
    assert all(isinstance(v, float) for v in s.values())


@pytest.mark.parametrize("reclaim", [False, True])
def test_no_buffer_is_handed_out_twice_under_threads(reclaim: bool) -> None:
    pool = BucketedPool(max_bytes="256KiB", growth=2.0, reclaim=reclaim, exact=reclaim)
    owners: dict[int, int] = {}
    errors: list[str] = []
    stop = time.monotonic() + 2.0
    shapes = [(16,), (100,), (33, 3), (512,), (1000,), (4000,)]

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        held: list[tuple[torch.Tensor, float]] = []
        n = 0
        while time.monotonic() < stop and not errors:
            n += 1
            if len(held) < 4 and rng.random() < 0.6:
                t = pool.empty(rng.choice(shapes), F32, CPU)
                owner = owners.setdefault(ptr(t), tid)  # atomic under the GIL
                if owner != tid:
                    errors.append(f"buffer {ptr(t):#x} handed to {tid} while {owner} holds it")
                    return
                mark = float(tid * 1_000_000 + n)
                t.fill_(mark)
                held.append((t, mark))
            elif held:
                t, mark = held.pop(rng.randrange(len(held)))
                if not bool((t == mark).all()):
                    errors.append(f"thread {tid}: a buffer it held was overwritten")
                    return
                del owners[ptr(t)]
                if reclaim and rng.random() < 0.5:
                    del t  # dropped: the pool may reclaim it once this was the last reference
                else:
                    pool.release(t)
            if n % 50 == 0:
                time.sleep(0)  # let the other threads interleave
        for t, _ in held:
            del owners[ptr(t)]
            pool.release(t)

    def meddler() -> None:
        # stats, cleanup and clear race with the workers too
        while time.monotonic() < stop and not errors:
            pool.stats()
            pool.cleanup(CPU)
            time.sleep(0.01)
            pool.clear()
            time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=meddler))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    s = check_books(pool)
    assert s["requests"] > 1000 and s["reuses"] > 0
    assert s["in_use_buffers"] == 0 and s["releases"] + s["dropped"] == s["requests"]
    assert (s["reclaims"] > 0) == reclaim and (s["dropped"] > 0) == reclaim


# --------------------------------------------------------------------------- reclaim and exact


def test_reclaim_takes_back_a_buffer_once_nothing_references_it() -> None:
    pool = BucketedPool(reclaim=True)
    a = pool.empty((64, 8), F32, CPU)
    pa = ptr(a)
    view = a[3:]
    del a
    b = pool.empty((64, 8), F32, CPU)  # the view still holds a's storage: not reclaimable
    assert ptr(b) != pa
    assert check_books(pool)["reclaimable_bytes"] == 0
    del view
    s = check_books(pool)
    assert s["reclaimable_bytes"] == 64 * 8 * 4 <= s["idle_bytes"]
    c = pool.empty((8, 64), F32, CPU)
    assert ptr(c) == pa and c.shape == (8, 64) and c.is_contiguous() and c._base is None
    s = check_books(pool)
    assert (s["reclaims"], s["reuses"], s["allocations"]) == (1, 1, 2)
    assert s["reclaimable_bytes"] == 0


def test_reclaim_waits_for_autograd_to_let_go() -> None:
    pool = BucketedPool(reclaim=True)
    x = torch.randn(32, requires_grad=True)
    buf = pool.empty((32,), F32, CPU)
    pb = ptr(buf)
    y = torch.mul(buf.copy_(x.detach()), x)  # mul saves buf for backward
    del buf
    assert ptr(pool.empty((32,), F32, CPU)) != pb  # the graph still needs it
    y.sum().backward()
    del y
    assert ptr(pool.empty((32,), F32, CPU)) == pb


def test_reclaim_respects_dtype_inference_mode_and_the_cap() -> None:
    pool = BucketedPool(reclaim=True, max_bytes=4096)
    a = pool.empty((256,), F32, CPU)  # 1 KiB
    pa = ptr(a)
    del a
    assert ptr(pool.empty((256,), torch.int32, CPU)) != pa  # same bytes, other dtype
    with torch.inference_mode():
        assert ptr(pool.empty((256,), F32, CPU)) != pa
    big = pool.empty((2048,), F32, CPU)  # 8 KiB > cap: tracked weakly only
    del big
    assert check_books(pool)["lent_bytes"] <= 4096
    pool.empty((2048,), F32, CPU)  # malloc may well return the same address: count instead
    assert check_books(pool)["reclaims"] == 0


def test_cleanup_and_clear_let_go_of_reclaimable_buffers() -> None:
    pool = BucketedPool(reclaim=True)
    a = pool.empty((128,), F32, CPU)
    del a
    assert pool.cleanup(CPU) == 512
    b = pool.empty((128,), F32, CPU)  # a fresh allocation (malloc may reuse the address)
    assert check_books(pool)["reclaims"] == 0
    del b
    pool.clear()
    assert check_books(pool)["reclaimable_bytes"] == 0
    c = pool.empty((128,), F32, CPU)
    assert c.shape == (128,) and check_books(pool)["reclaims"] == 0


def test_reclaimable_buffers_of_a_shape_that_stopped_coming_are_let_go() -> None:
    pool = BucketedPool(reclaim=True, exact=True, reclaim_idle_requests=20, check_every=5)
    old = pool.empty((384,), F32, CPU)
    del old
    assert check_books(pool)["reclaimable_bytes"] == 1536
    for _ in range(30):  # another shape, over and over
        pool.empty((128,), F32, CPU)
    s = check_books(pool)
    assert s["reclaimable_bytes"] == 512 and s["lent_bytes"] == 512  # the (128,) buffer only
    assert s["reclaims"] == 29


def test_exact_buffers_have_no_slack_and_serve_only_requests_that_fit() -> None:
    pool = BucketedPool(growth=2.0, exact=True)
    a = pool.empty((275,), F32, CPU)  # 1100 bytes: the 2048-byte bucket, a 1536-byte buffer
    pa = ptr(a)
    assert a.untyped_storage().nbytes() == 1536 and check_books(pool)["slack_bytes"] == 436
    pool.release(a)
    b = pool.empty((500,), F32, CPU)  # 2000 bytes, same bucket: a is too small
    pb = ptr(b)
    assert pb != pa and b.untyped_storage().nbytes() == 2048
    pool.release(b)
    assert ptr(pool.empty((300,), F32, CPU)) == pb  # 1200 bytes: the newest that fits
    assert ptr(pool.empty((275,), F32, CPU)) == pa
    s = check_books(pool)
    assert (s["reuses"], s["allocations"]) == (2, 2)
    assert BucketedPool(growth=2.0).empty((275,), F32, CPU).untyped_storage().nbytes() == 2048


# --------------------------------------------------------------------------- config


def test_build_pool_from_the_config_files() -> None:
    assert set(POOLS) >= {"none", "bucketed", "torch"}
    assert isinstance(build_pool(**OmegaConf.load(CONF / "none.yaml")), NoPool)
    pool = build_pool(**OmegaConf.load(CONF / "bucketed.yaml"))
    assert isinstance(pool, BucketedPool) and pool.max_bytes == 2**30


def test_env_var_sets_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DILEXP_MEMORY_MAX_BYTES", "512MB")
    cfg = OmegaConf.load(CONF / "bucketed.yaml")
    assert build_pool(**cfg).max_bytes == 512 * 10**6


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"max_bytes": "lots"}, "memory.max_bytes"),
        ({"max_bytes": -1}, "memory.max_bytes"),
        ({"growth": 1.0}, "memory.growth"),
        ({"reclaim": "yes"}, "memory.reclaim"),
        ({"reclaim_idle_requests": 0}, "memory.reclaim_idle_requests"),
        ({"growth": "fast"}, "memory.growth"),
        ({"min_bucket_bytes": 0}, "memory.min_bucket_bytes"),
        ({"min_free_fraction": 1.5}, "memory.min_free_fraction"),
        ({"check_every": 0}, "memory.check_every"),
        ({"bucket": 3}, "memory.bucketed"),
    ],
)
def test_bad_settings_name_the_field(settings: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_pool("bucketed", **settings)
    assert str(e.value).startswith(field)


def test_unknown_kind_and_byte_parsing() -> None:
    with pytest.raises(ConfigError, match=r"^memory.kind='huge'"):
        build_pool("huge")
    assert parse_bytes("f", "1GiB") == 2**30
    assert parse_bytes("f", "1.5 kb") == 1500
    assert parse_bytes("f", "2048") == 2048
    assert parse_bytes("f", 1e9) == 10**9
    assert parse_bytes("f", None) is None and parse_bytes("f", "none") is None


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a machine without CUDA gives")
def test_torch_pool_needs_cuda() -> None:
    with pytest.raises(ConfigError, match=r"^memory.kind='torch': needs CUDA"):
        build_pool("torch")
    with pytest.raises(ConfigError, match="needs CUDA"):
        build_pool(**OmegaConf.load(CONF / "torch.yaml"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="torch.cuda.MemPool needs CUDA")
def test_torch_pool_on_cuda() -> None:
    pool = build_pool("torch")
    a = pool.empty((1024, 1024), F32, "cuda")
    assert a.is_cuda and a.shape == (1024, 1024)
    pa = a.data_ptr()
    pool.release(a)
    del a
    b = pool.empty((1024, 1024), F32, "cuda")
    s = pool.stats()
    assert s["requests"] == 2 and s["releases"] == 1 and s["in_use_buffers"] == 1
    assert b.data_ptr() != pa or s["reuses"] == 1
    assert pool.empty((4,), F32, CPU).device == CPU and pool.stats()["unpooled"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_bucketed_on_cuda_keys_by_stream_and_probes_pressure() -> None:
    pool = BucketedPool(check_every=1)
    a = pool.empty((1024,), F32, "cuda")
    pa = ptr(a)
    pool.release(a)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        b = pool.empty((1024,), F32, "cuda")
    assert ptr(b) != pa  # another stream never gets it
    assert ptr(pool.empty((1024,), F32, "cuda")) == pa
    available, total = pool._available_bytes(torch.device("cuda", torch.cuda.current_device()))
    assert 0 < available <= total


# --------------------------------------------------------------------------- telemetry


def test_memory_snapshot_on_cpu() -> None:
    snap = memory_snapshot("cpu")
    assert snap["peak_rss_mb"] > 0 and snap["rss_mb"] > 0
    assert snap["rss_mb"] <= snap["peak_rss_mb"]
    assert all(isinstance(v, float) for v in snap.values())
    assert "allocated_mb" not in snap
    reset_peak("cpu")
    keep = torch.ones(8 * 2**20 // 4)  # 8 MiB, touched
    snap2 = memory_snapshot(CPU)
    assert "rss_delta_mb" in snap2
    assert 0 < snap2["peak_rss_since_reset_mb"] <= snap2["peak_rss_mb"]
    del keep


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_memory_snapshot_on_cuda() -> None:
    reset_peak("cuda")
    x = torch.empty(2**20, device="cuda")
    snap = memory_snapshot("cuda")
    for key in ["allocated_mb", "peak_allocated_mb", "reserved_mb", "peak_reserved_mb", "num_alloc_retries",
                "num_ooms", "fragmentation_mb", "peak_rss_mb"]:
        assert key in snap
    assert snap["peak_allocated_mb"] >= 4 and snap["fragmentation_mb"] >= 0
    del x


# --------------------------------------------------------------------------- attention with a pool

HAS_IMPROVED = importlib.util.find_spec("dilexp.attention.improved") is not None


@pytest.mark.skipif(not HAS_IMPROVED, reason="dilexp/attention/improved.py not there yet")
@pytest.mark.parametrize("heads", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True])
def test_improved_attention_is_the_same_with_a_pool(heads: str, causal: bool) -> None:
    from dilexp.attention import build

    cfg = dict(num_heads=4, head_dim=8, segment_lengths=[8, 16], dilation_rates=[1, 2], heads=heads)
    pool = build_pool("bucketed")
    plain, pooled = build("improved", **cfg, pool=None), build("improved", **cfg, pool=pool)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 36, 4, 8, generator=gen) for _ in range(3))  # 36: a ragged last segment
    grad = torch.randn(2, 36, 4, 8, generator=gen)

    def run(attn: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        qi, ki, vi = (x.clone().requires_grad_() for x in (q, k, v))
        out = attn(qi, ki, vi, causal=causal)
        out.backward(grad)
        return out.detach().clone(), qi.grad, ki.grad, vi.grad

    want = run(plain)
    for _ in range(2):
        # Poison: the pool holds garbage-filled buffers of every shape the variant asks for.
        for shape in [(2, 36, 4, 8), (2, 36, 4)]:
            junk = [pool.empty(shape, F32, CPU).fill_(float("nan")) for _ in range(4)]
            for j in junk:
                pool.release(j)
        before = pool.stats()["reuses"]
        got = run(pooled)
        assert pool.stats()["reuses"] > before  # the variant did get poisoned buffers
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_IMPROVED, reason="dilexp/attention/improved.py not there yet")
@pytest.mark.parametrize("variant", ["improved", "ring_v2"])
def test_training_steps_reuse_outputs_and_gradients_with_reclaim(variant: str) -> None:
    """Step after step the pool hands back the last step's output and gradients (nobody
    releases them: autograd owns them), and every step still equals the plain build."""
    from dilexp.attention import build

    cfg = dict(num_heads=4, head_dim=8, segment_lengths=[8, 16], dilation_rates=[1, 2])
    pool = build_pool("bucketed", reclaim=True, exact=True)
    plain, pooled = build(variant, **cfg, pool=None), build(variant, **cfg, pool=pool)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        q, k, v = (torch.randn(2, 40, 4, 8, generator=gen, requires_grad=True) for _ in range(3))
        grad = torch.randn(2, 40, 4, 8, generator=gen)
        want = torch.autograd.grad(plain(q, k, v, causal=True), (q, k, v), grad)
        got = torch.autograd.grad(pooled(q, k, v, causal=True), (q, k, v), grad)
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        del got, g  # the gradients die here: the next step may take them back
        s = check_books(pool)
        if step == 0:
            assert s["reclaims"] == 0
    assert s["reclaims"] >= 2 * 4  # output and three gradients, in steps 2 and 3
    assert s["allocations"] < s["requests"] / 2
