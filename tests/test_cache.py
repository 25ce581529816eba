"""Pattern-cache strategies: one interface, LRU/tier policy, settings, stats (DESIGN section 4)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dilexp.cache import (
    STAT_KEYS,
    LocalCache,
    LRUCache,
    NoCache,
    TwoTierCache,
    as_device,
    build_cache,
    collect_stats,
    global_cache,
    pregenerate_patterns,
    reset_global_cache,
)
from dilexp.cache import settings as S
from dilexp.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "cache"
ENV_VARS = (S.ENV_MAX_ENTRIES, S.ENV_MAX_BYTES, S.ENV_HOT_MAX_BYTES, S.ENV_PROMOTE_AFTER, S.ENV_PREGENERATE)
META = torch.device("meta")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch):
    # Shared instances and PATTERN_CACHE_* variables would leak between tests otherwise.
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    reset_global_cache()
    yield
    reset_global_cache()


def pat(i: int, n: int = 10) -> torch.Tensor:
    """A pattern of n int32 values (4n bytes) that identifies its key."""
    return torch.arange(n, dtype=torch.int32) + 1000 * i


class Builder:
    """A build_fn factory that counts builds per key."""

    def __init__(self, n: int = 10) -> None:
        self.n = n
        self.calls: dict[object, int] = {}

    def __call__(self, i: int):
        def build() -> torch.Tensor:
            self.calls[i] = self.calls.get(i, 0) + 1
            return pat(i, self.n)

        return build


def get(cache, i: int, build: Builder, device: str | torch.device = "cpu") -> torch.Tensor:
    return cache.get_or_build(("k", i), build(i), device)


# -- build_cache and the shared instances ---------------------------------------------


def test_per_module_strategies_are_new_instances() -> None:
    assert build_cache("none") is not build_cache("none")
    assert build_cache("local") is not build_cache("local")
    assert isinstance(build_cache("none"), NoCache)
    assert isinstance(build_cache("local"), LocalCache)


@pytest.mark.parametrize("strategy", ["cpu", "gpu"])
def test_process_wide_strategies_share_one_instance(strategy: str) -> None:
    first = build_cache(strategy)
    assert build_cache(strategy) is first
    # a later call with settings reconfigures the shared instance, as one per layer would
    assert build_cache(strategy, max_entries=3) is first
    assert first.max_entries == 3
    reset_global_cache()
    assert build_cache(strategy) is not first


def test_global_cache_is_the_cpu_instance_and_reset_drops_counters() -> None:
    cache = global_cache()
    assert isinstance(cache, LRUCache)
    assert build_cache("cpu") is cache
    b = Builder()
    get(cache, 1, b)
    get(cache, 1, b)
    assert cache.stats()["hits"] == 1
    reset_global_cache()
    fresh = global_cache()
    assert fresh is not cache
    assert fresh.stats()["hits"] == 0 and fresh.keys() == []


def test_build_cache_rejects_unknown_strategy_and_settings() -> None:
    with pytest.raises(ConfigError, match=r"^cache\.strategy="):
        build_cache("redis")
    with pytest.raises(ConfigError, match=r"^cache\.max_entries="):
        build_cache("local", max_entries=4)
    with pytest.raises(ConfigError, match=r"^cache\.hot_max_bytes="):
        build_cache("cpu", hot_max_bytes=4)


@pytest.mark.parametrize("strategy", ["none", "local", "cpu", "gpu"])
def test_stats_have_one_key_set(strategy: str) -> None:
    cache = build_cache(strategy)
    b = Builder()
    get(cache, 1, b)
    get(cache, 1, b)
    stats = cache.stats()
    assert tuple(stats) == STAT_KEYS
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["hits"] + stats["misses"] == 2
    assert stats["build_s"] > 0
    hits = 0 if strategy == "none" else 1
    assert stats["hits"] == hits and stats["hit_rate"] == hits / 2


def test_none_builds_every_time() -> None:
    cache, b = build_cache("none"), Builder()
    for _ in range(3):
        assert torch.equal(get(cache, 1, b), pat(1))
    assert b.calls == {1: 3}
    assert cache.keys() == []


@pytest.mark.parametrize("strategy", ["local", "cpu", "gpu"])
def test_hits_serve_the_built_values_and_clear_keeps_counters(strategy: str) -> None:
    cache, b = build_cache(strategy), Builder()
    for _ in range(4):
        for i in range(3):
            assert torch.equal(get(cache, i, b), pat(i))
    assert b.calls == {0: 1, 1: 1, 2: 1}
    assert sorted(cache.keys()) == [("k", 0), ("k", 1), ("k", 2)]
    cache.clear()
    stats = cache.stats()
    assert stats["entries"] == 0 and stats["bytes"] == 0 and cache.keys() == []
    assert stats["hits"] == 9 and stats["misses"] == 3
    get(cache, 0, b)
    assert b.calls[0] == 2


# -- the cpu LRU ---------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_by_count() -> None:
    cache, b = build_cache("cpu", max_entries=3), Builder()
    for i in range(3):
        get(cache, i, b)
    get(cache, 0, b)  # 0 becomes the most recently used
    get(cache, 3, b)  # evicts 1, the least recently used
    assert cache.keys() == [("k", 2), ("k", 0), ("k", 3)]
    stats = cache.stats()
    assert stats["evictions"] == 1 and stats["entries"] == 3
    get(cache, 1, b)
    assert b.calls[1] == 2  # it was really gone
    assert cache.keys() == [("k", 0), ("k", 3), ("k", 1)]


def test_lru_evicts_by_bytes_and_never_stores_an_oversized_pattern() -> None:
    cache, b = build_cache("cpu", max_bytes=100), Builder(n=10)  # 40 bytes each: two fit
    get(cache, 0, b)
    get(cache, 1, b)
    assert cache.stats()["bytes"] == 80
    get(cache, 0, b)
    get(cache, 2, b)  # 120 > 100: evicts 1
    assert cache.keys() == [("k", 0), ("k", 2)]
    assert cache.stats()["bytes"] == 80 and cache.stats()["evictions"] == 1

    big = cache.get_or_build("big", lambda: torch.zeros(50, dtype=torch.int32), "cpu")  # 200 bytes
    assert big.shape == (50,)
    assert cache.keys() == [("k", 0), ("k", 2)]  # served, not stored, nothing flushed
    assert cache.stats()["evictions"] == 2


def test_shrinking_a_shared_cache_evicts_at_once() -> None:
    cache, b = build_cache("cpu"), Builder()
    for i in range(5):
        get(cache, i, b)
    build_cache("cpu", max_entries=2)
    assert cache.keys() == [("k", 3), ("k", 4)]
    assert cache.stats()["evictions"] == 3


def test_cpu_cache_stores_on_host_and_copies_on_each_hit() -> None:
    cache, b = build_cache("cpu"), Builder(n=10)
    first = get(cache, 1, b, META)
    assert first.device == META
    for _ in range(3):
        out = get(cache, 1, b, META)
        assert out.device == META and out.shape == (10,)
    stats = cache.stats()
    assert stats["h2d_copies"] == 3 and stats["h2d_bytes"] == 3 * 40
    assert stats["cold_bytes"] == 40 and stats["hot_bytes"] == 0
    # a CPU hit is the stored object itself: no copy, nothing counted
    a = get(cache, 2, b)
    assert get(cache, 2, b) is a
    assert cache.stats()["h2d_copies"] == 3


def test_a_pattern_built_on_meta_stays_there() -> None:
    # meta tensors cannot be copied out to the host; the cache keeps them as they are
    cache = build_cache("cpu")
    build = lambda: torch.empty(4, device=META)
    assert cache.get_or_build("m", build, META).device == META
    assert cache.get_or_build("m", build, META).device == META
    assert cache.stats()["hits"] == 1 and cache.stats()["h2d_copies"] == 0


# -- device isolation -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["local", "cpu", "gpu"])
def test_device_is_part_of_the_lookup(strategy: str) -> None:
    cache, b = build_cache(strategy), Builder()
    on_cpu = get(cache, 1, b, "cpu")
    on_meta = get(cache, 1, b, META)
    assert on_cpu.device.type == "cpu" and on_meta.device == META
    assert b.calls[1] == 2  # a pattern for one device is never served to another
    for _ in range(3):
        assert get(cache, 1, b, "meta").device == META
        assert get(cache, 1, b, torch.device("cpu")).device.type == "cpu"
        assert get(cache, 1, b, None).device.type == "cpu"
    stats = cache.stats()
    assert stats["misses"] == 2 and stats["hits"] == 9 and stats["entries"] == 2
    assert cache.keys().count(("k", 1)) == 2


def test_as_device_normalises_the_spellings_of_one_device() -> None:
    assert as_device(None) == as_device("cpu") == as_device(torch.device("cpu"))
    assert as_device("meta") == META
    assert as_device("cpu") is as_device("cpu")  # memoised


# -- the gpu two-tier cache (hot tier on the CPU device here) ------------------------------


def test_promotion_after_promote_after_cold_hits() -> None:
    cache, b = build_cache("gpu", promote_after=2), Builder()
    assert isinstance(cache, TwoTierCache)
    get(cache, 1, b)
    assert cache.tier_of(("k", 1), "cpu") == "cold"
    get(cache, 1, b)
    assert cache.tier_of(("k", 1), "cpu") == "cold"
    get(cache, 1, b)  # second cold hit
    assert cache.tier_of(("k", 1), "cpu") == "hot"
    get(cache, 1, b)
    stats = cache.stats()
    assert stats["promotions"] == 1 and stats["hits"] == 3 and stats["misses"] == 1
    assert stats["hot_entries"] == 1 and stats["cold_entries"] == 0
    assert stats["hot_bytes"] == stats["bytes"] == 40
    assert b.calls == {1: 1}


def test_promotion_copies_to_the_device_once() -> None:
    cache, b = build_cache("gpu", promote_after=1), Builder()
    get(cache, 1, b, META)
    assert get(cache, 1, b, META).device == META  # cold hit: copied, then promoted
    assert get(cache, 1, b, META).device == META  # hot hit: no copy
    stats = cache.stats()
    assert stats["h2d_copies"] == 1 and stats["h2d_bytes"] == 40 and stats["promotions"] == 1


def test_demotion_on_hot_tier_pressure() -> None:
    cache, b = build_cache("gpu", promote_after=1, hot_max_bytes=100), Builder(n=10)  # two fit
    for i in range(3):
        get(cache, i, b)
    get(cache, 0, b)
    get(cache, 1, b)
    assert cache.stats()["hot_bytes"] == 80
    get(cache, 2, b)  # promoting 2 demotes 0, the least recently used hot entry
    assert [cache.tier_of(("k", i), "cpu") for i in range(3)] == ["cold", "hot", "hot"]
    stats = cache.stats()
    assert stats["promotions"] == 3 and stats["demotions"] == 1
    assert stats["hot_bytes"] == 80 and stats["cold_bytes"] == 40 and stats["bytes"] == 120
    # a demoted entry starts counting towards promotion again
    get(cache, 0, b)
    assert cache.tier_of(("k", 0), "cpu") == "hot"
    assert cache.tier_of(("k", 1), "cpu") == "cold"
    assert b.calls == {0: 1, 1: 1, 2: 1}
    assert torch.equal(get(cache, 1, b), pat(1))


def test_cold_tier_evicts_and_too_big_patterns_stay_cold() -> None:
    cache, b = build_cache("gpu", max_entries=2, hot_max_bytes=50, promote_after=1), Builder(n=10)
    for i in range(3):
        get(cache, i, b)
    assert cache.keys() == [("k", 1), ("k", 2)] and cache.stats()["evictions"] == 1
    big = lambda: torch.zeros(20, dtype=torch.int32)  # 80 bytes > hot_max_bytes
    for _ in range(3):
        cache.get_or_build("big", big, "cpu")
    assert cache.tier_of("big", "cpu") == "cold"
    assert cache.stats()["promotions"] == 0


def test_pregeneration_gives_hit_rate_one() -> None:
    cache, b = build_cache("gpu", promote_after=3), Builder()
    assert cache.pregenerate is True  # the default
    with cache.pregenerating():
        for i in range(5):
            get(cache, i, b)
        get(cache, 0, b)  # a repeat inside pregeneration is not a hit either
    stats = cache.stats()
    assert stats["hits"] == stats["misses"] == 0 and stats["hit_rate"] == 0
    assert stats["pregenerated"] == 5 and stats["hot_entries"] == 5 and stats["build_s"] > 0
    for _ in range(4):
        for i in range(5):
            assert torch.equal(get(cache, i, b), pat(i))
    stats = cache.stats()
    assert stats["hit_rate"] == 1.0 and stats["hits"] == 20 and stats["misses"] == 0
    assert stats["promotions"] == 0 and stats["h2d_copies"] == 0
    assert all(n == 1 for n in b.calls.values())


def test_pregeneration_promotes_cold_entries_and_respects_the_hot_limit() -> None:
    cache, b = build_cache("gpu", promote_after=5, hot_max_bytes=100), Builder(n=10)
    get(cache, 0, b)
    with cache.pregenerating():
        get(cache, 0, b)  # cold -> hot at once
        get(cache, 1, b)
        get(cache, 2, b)  # the hot tier holds two: 0 is demoted
    assert cache.tier_of(("k", 0), "cpu") == "cold"
    assert cache.tier_of(("k", 2), "cpu") == "hot"
    stats = cache.stats()
    assert stats["misses"] == 1 and stats["hits"] == 0
    assert stats["promotions"] == 1 and stats["demotions"] == 1 and stats["pregenerated"] == 2


def test_pregeneration_is_per_thread() -> None:
    cache, b = build_cache("gpu"), Builder()
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        get(cache, 7, b)  # another thread's lookup counts as usual
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with cache.pregenerating():
        get(cache, 1, b)
        inside.set()
        done.wait(10)
    t.join()
    stats = cache.stats()
    assert stats["misses"] == 1 and stats["pregenerated"] == 1
    assert cache.tier_of(("k", 7), "cpu") == "cold" and cache.tier_of(("k", 1), "cpu") == "hot"


@pytest.mark.parametrize("strategy", ["none", "local", "cpu"])
def test_pregenerating_elsewhere_counts_ordinary_lookups(strategy: str) -> None:
    cache, b = build_cache(strategy), Builder()
    assert cache.pregenerate is False
    with cache.pregenerating():
        get(cache, 1, b)
    assert cache.stats()["misses"] == 1


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("64", 64), (64, 64), (64.0, 64), (" 7 ", 7), ("1e3", 1000), ("1KiB", 1024), ("2MB", 2_000_000),
     ("1.5GiB", 3 << 29), ("512B", 512)],
)
def test_byte_settings_coerce(value: object, expected: int) -> None:
    assert build_cache("cpu", max_bytes=value).max_bytes == expected


@pytest.mark.parametrize("value", ["abc", "0", 0, -1, "-5", 1.5, True, "", [4], "1XB"])
def test_bad_int_settings_name_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^cache\.max_bytes="):
        build_cache("cpu", max_bytes=value)
    with pytest.raises(ConfigError, match=r"^cache\.promote_after="):
        build_cache("gpu", promote_after=value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("True", True), ("false", False), ("0", False), ("yes", True), (False, False), (1, True)],
)
def test_bool_settings_coerce(value: object, expected: bool) -> None:
    assert build_cache("gpu", pregenerate=value).pregenerate is expected


def test_bad_bool_setting_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^cache\.pregenerate="):
        build_cache("gpu", pregenerate="maybe")


def test_a_bad_setting_leaves_the_shared_cache_unchanged() -> None:
    cache = build_cache("gpu", max_entries=5, promote_after=3)
    with pytest.raises(ConfigError):
        build_cache("gpu", max_entries=9, promote_after="x")
    assert cache.max_entries == 5 and cache.promote_after == 3


def test_unset_settings_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(S.ENV_MAX_ENTRIES, "7")
    monkeypatch.setenv(S.ENV_HOT_MAX_BYTES, "1MiB")
    monkeypatch.setenv(S.ENV_PREGENERATE, "off")
    assert global_cache().max_entries == 7
    gpu = build_cache("gpu")
    assert gpu.hot_max_bytes == 1 << 20 and gpu.pregenerate is False and gpu.max_entries == 7
    monkeypatch.setenv(S.ENV_MAX_BYTES, "nope")
    reset_global_cache()
    with pytest.raises(ConfigError, match=r"^cache\.max_bytes="):
        global_cache()


def test_oc_env_settings_compose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(S.ENV_MAX_ENTRIES, "12")
    monkeypatch.setenv(S.ENV_MAX_BYTES, "2048")
    cfg = OmegaConf.create({"cache": {
        "strategy": "cpu",
        "max_entries": "${oc.env:PATTERN_CACHE_MAX_SIZE,256}",
        "max_bytes": "${oc.env:PATTERN_CACHE_MAX_BYTES,1073741824}",
    }})
    OmegaConf.resolve(cfg)
    assert cfg.cache.max_entries == "12"  # oc.env hands over strings
    cache = build_cache(**cfg.cache)
    assert (cache.max_entries, cache.max_bytes) == (12, 2048)


@pytest.mark.parametrize("name", ["none", "local", "cpu", "gpu"])
def test_shipped_yaml_composes_with_and_without_env(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cache = build_cache(**OmegaConf.to_container(cfg, resolve=True))
    assert cache.name == name
    if name in ("cpu", "gpu"):
        # the yaml defaults equal the code defaults
        assert cache.max_entries == S.DEFAULT_MAX_ENTRIES and cache.max_bytes == S.DEFAULT_MAX_BYTES
        reset_global_cache()
        monkeypatch.setenv(S.ENV_MAX_ENTRIES, "3")
        monkeypatch.setenv(S.ENV_PROMOTE_AFTER, "4")
        cache = build_cache(**OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True))
        assert cache.max_entries == 3
    if name == "gpu":
        assert cache.promote_after == 4 and cache.pregenerate is S.DEFAULT_PREGENERATE
        assert cache.hot_max_bytes == S.DEFAULT_HOT_MAX_BYTES


# -- stats across layers -------------------------------------------------------------------------


def test_collect_stats_counts_a_shared_instance_once() -> None:
    b = Builder()
    shared = [build_cache("cpu") for _ in range(4)]
    for cache in shared:
        get(cache, 1, b)
    stats = collect_stats(shared)
    assert stats["hits"] == 3 and stats["misses"] == 1 and stats["hit_rate"] == 0.75

    local = [build_cache("local") for _ in range(4)]
    for cache in local:
        get(cache, 1, b)
        get(cache, 1, b)
    stats = collect_stats(local)
    assert stats["hits"] == 4 and stats["misses"] == 4 and stats["entries"] == 4 and stats["hit_rate"] == 0.5


def test_pregenerate_patterns_prepares_only_modules_that_ask() -> None:
    class Module:
        def __init__(self, cache) -> None:
            self.cache = cache
            self.prepared: list[int] = []

        def prepare(self, n: int, device: str, causal: bool | None = None) -> None:
            self.prepared.append(n)
            for i in range(3):
                self.cache.get_or_build(("pre", n, i), lambda i=i: pat(i), device)

    gpu_layers = [Module(build_cache("gpu")) for _ in range(2)]
    local_layer = Module(build_cache("local"))
    assert pregenerate_patterns([*gpu_layers, local_layer, object()], 64, "cpu") == 2
    assert local_layer.prepared == [] and all(m.prepared == [64] for m in gpu_layers)
    stats = gpu_layers[0].cache.stats()
    assert stats["pregenerated"] == 3 and stats["hot_entries"] == 3 and stats["misses"] == 0
    for i in range(3):
        gpu_layers[1].cache.get_or_build(("pre", 64, i), lambda: pytest.fail("rebuilt"), "cpu")
    assert gpu_layers[0].cache.stats()["hit_rate"] == 1.0


# -- on a real GPU (skipped without CUDA) ------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_cpu_strategy_keeps_patterns_on_host_and_copies_to_cuda() -> None:
    cache, b = build_cache("cpu"), Builder()
    cuda = as_device("cuda")
    assert get(cache, 1, b, "cuda").device == cuda
    assert cache._store[(("k", 1), cuda)][0].device.type == "cpu"
    out = get(cache, 1, b, cuda)  # "cuda" and "cuda:<current>" are one slot
    assert out.device == cuda and torch.equal(out.cpu(), pat(1))
    # built on the device, stored on the host
    cache.get_or_build("dev", lambda: pat(2).to(cuda), cuda)
    assert cache._store[("dev", cuda)][0].device.type == "cpu"
    stats = cache.stats()
    assert stats["h2d_copies"] == 1 and stats["h2d_bytes"] == 40 and stats["lookup_s"] > 0
    assert b.calls == {1: 1}


@pytest.mark.gpu
@needs_cuda
def test_gpu_strategy_hot_tier_on_cuda_cold_tier_on_host() -> None:
    cache, b = build_cache("gpu", promote_after=1, hot_max_bytes=50), Builder()  # one pattern fits
    cuda = as_device("cuda")
    get(cache, 1, b, cuda)
    assert cache._cold[(("k", 1), cuda)].pattern.device.type == "cpu"
    get(cache, 1, b, cuda)  # copied and promoted
    assert cache._hot[(("k", 1), cuda)][0].device == cuda
    get(cache, 2, b, cuda)
    get(cache, 2, b, cuda)  # promoting 2 demotes 1 back to the host
    assert cache._cold[(("k", 1), cuda)].pattern.device.type == "cpu"
    assert cache.tier_of(("k", 2), cuda) == "hot"
    for i in (1, 2):
        out = get(cache, i, b, cuda)
        assert out.device == cuda and torch.equal(out.cpu(), pat(i))
    stats = cache.stats()
    # each cold hit copies, promotes, and pushes the other pattern out
    assert stats["promotions"] == 4 and stats["demotions"] == 3 and stats["h2d_copies"] == 4
    with cache.pregenerating():
        cache.get_or_build("pre", lambda: pat(3), cuda)
    assert cache._hot[("pre", cuda)][0].device == cuda


@pytest.mark.parametrize("variant", ["dilated", "block_sparse", "ring_v3"])
def test_pregenerating_one_mask_builds_only_its_patterns_and_the_calls_all_hit(variant: str) -> None:
    """A language model only ever calls with causal=True: pre-building the other mask's
    patterns would hold memory for nothing (it doubled the gpu cache's bytes)."""
    from dilexp.attention import build

    settings = {"block_sparse": dict(block_size=8)}.get(
        variant, dict(segment_lengths=[8, 16], dilation_rates=[1, 2]))
    entries = {}
    for causal in (None, True):
        reset_global_cache()  # the gpu strategy is process-wide
        cache = build_cache("gpu", pregenerate=True)
        attn = build(variant, num_heads=2, head_dim=4, cache=cache, **settings)
        pregenerate_patterns([attn], 32, "cpu", causal=causal)
        entries[causal] = cache.stats()["entries"]
        if causal:
            x = torch.randn(1, 32, 2, 4)
            attn(x, x, x, causal=True)
            st = cache.stats()
            assert st["misses"] == 0 and st["entries"] == entries[True]
    assert 0 < entries[True] < entries[None]
