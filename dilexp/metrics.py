"""One vocabulary of metrics: names, labels, units and kind, for telemetry, bench rows, sweep.json and compare.

A name is what a figure is called everywhere it is stored: the training metrics line and
W&B (``cache/hit_rate``), a bench row and bench.csv (the same ``cache/hit_rate``), sweep.json's
headline and compare's columns. ``kind`` says how a figure over an interval is read:

- ``counter``: grows while the run goes (hits, allocations); over a case, its growth counts.
- ``level``: stands at a value (entries held, a peak, a rate); over a case, its value at the end.

Run records written before bench rows took training's names (``cache_hit_rate``,
``pool_requests``) are read through ``canonical``, which maps the old names to these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

COUNTER, LEVEL = "counter", "level"
CACHE_PREFIX = "cache/"
POOL_PREFIX = "memory/pool_"


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # short column title for people; files keep the name
    unit: str  # "" for counts and plain numbers, "fraction" for 0..1 rates
    kind: str = LEVEL


def _cache(stat: str, label: str, unit: str = "", kind: str = COUNTER) -> Metric:
    return Metric(CACHE_PREFIX + stat, label, unit, kind)


def _pool(stat: str, label: str, unit: str = "", kind: str = COUNTER) -> Metric:
    return Metric(POOL_PREFIX + stat, label, unit, kind)


# Pattern cache statistics (PatternCache.stats(), merged over a model's caches).
CACHE_METRICS = (
    _cache("hits", "cache hits"), _cache("misses", "cache misses"),
    _cache("hit_rate", "cache hit", "fraction", LEVEL), _cache("evictions", "cache evictions"),
    _cache("entries", "cache entries", kind=LEVEL), _cache("bytes", "cache bytes", "B", LEVEL),
    _cache("promotions", "promotions"), _cache("demotions", "demotions"),
    _cache("h2d_copies", "h2d copies"), _cache("h2d_bytes", "h2d bytes", "B"),
    _cache("build_s", "build s", "s"), _cache("lookup_s", "lookup s", "s"),
    _cache("hot_entries", "hot entries", kind=LEVEL), _cache("hot_bytes", "hot bytes", "B", LEVEL),
    _cache("cold_entries", "cold entries", kind=LEVEL), _cache("cold_bytes", "cold bytes", "B", LEVEL),
    _cache("pregenerated", "pregenerated"),
)
# Buffer pool statistics (MemoryPool.stats()).
POOL_METRICS = (
    _pool("requests", "pool requests"), _pool("reuses", "pool reuses"), _pool("allocations", "pool allocations"),
    _pool("releases", "pool releases"), _pool("ignored_releases", "ignored releases"),
    _pool("dropped", "pool dropped"), _pool("evictions", "pool evictions"),
    _pool("evicted_bytes", "evicted bytes", "B"), _pool("cleanups", "pool cleanups"),
    _pool("cleanup_bytes", "cleanup bytes", "B"), _pool("cleared_bytes", "cleared bytes", "B"),
    _pool("dropped_bytes", "dropped bytes", "B"), _pool("oom_retries", "OOM retries"),
    _pool("reclaims", "reclaims"), _pool("reclaimed_bytes", "reclaimed bytes", "B"),
    _pool("allocated_bytes", "allocated bytes", "B"), _pool("unpooled", "unpooled"),
    _pool("reuse_rate", "pool reuse", "fraction", LEVEL),
    _pool("in_use_buffers", "buffers in use", kind=LEVEL), _pool("in_use_bytes", "bytes in use", "B", LEVEL),
    _pool("peak_in_use_bytes", "peak in use", "B", LEVEL), _pool("pooled_buffers", "pooled buffers", kind=LEVEL),
    _pool("pooled_bytes", "pooled bytes", "B", LEVEL), _pool("peak_pooled_bytes", "peak pooled", "B", LEVEL),
    _pool("idle_bytes", "idle bytes", "B", LEVEL), _pool("reclaimable_bytes", "reclaimable", "B", LEVEL),
    _pool("lent_bytes", "lent bytes", "B", LEVEL), _pool("reserved_bytes", "pool reserved", "B", LEVEL),
    _pool("slack_bytes", "slack bytes", "B", LEVEL),
)
# A training run: the metrics line, its summary, W&B.
TRAIN_METRICS = (
    Metric("train/loss", "loss", ""), Metric("val/loss", "val loss", ""), Metric("val/acc", "val acc", "fraction"),
    Metric("perf/step_ms", "step ms", "ms"), Metric("perf/step_ms_median", "step ms", "ms"),
    Metric("perf/tokens_per_s", "tok/s", "1/s"), Metric("perf/tokens_per_s_median", "tok/s", "1/s"),
    Metric("perf/tokens_per_s_per_device", "tok/s/dev", "1/s"),
    Metric("perf/tokens_per_s_per_device_median", "tok/s/dev", "1/s"),
    Metric("mesh/dp", "dp", ""), Metric("mesh/cp", "cp", ""),
    Metric("perf/tflops", "TFLOP/s (model)", "TFLOP/s"), Metric("perf/tflops_median", "TFLOP/s (model)", "TFLOP/s"),
    Metric("perf/mfu", "MFU (model)", "fraction"),
    Metric("memory/peak_allocated_mb", "peak alloc MB", "MB"), Metric("memory/peak_reserved_mb", "peak reserved MB",
                                                                       "MB"),
    Metric("memory/peak_rss_mb", "peak RSS MB", "MB"),
    Metric("memory/model_state_mb", "model state MB", "MB"),
)
# A bench row's own figures (one case of one candidate). Its TFLOP/s is by the row's
# ``flop_count`` (kernel for the attention target, model for the model target).
BENCH_METRICS = (
    Metric("median_ms", "median ms", "ms"), Metric("per_call_ns", "ns/call", "ns"),
    Metric("tflops", "TFLOP/s", "TFLOP/s"), Metric("gflops", "GFLOP/s", "GFLOP/s"),
    Metric("frac_of_matmul", "of matmul", "fraction"), Metric("tokens_per_s", "tok/s", "1/s"),
    Metric("speedup_vs_sdpa", "speedup vs sdpa", "x"), Metric("speedup_vs_compare", "speedup vs compare", "x"),
    Metric("peak_alloc_mb", "peak MB", "MB"), Metric("peak_held_mb", "peak held MB", "MB"),
    Metric("bench/cases_ok", "cases ok", ""), Metric("bench/cases_oom", "oom", ""),
    Metric("bench/cases_error", "errors", ""),
)
# Figures worth a glance in sweep.json and the end-of-sweep table (the rest: dilexp.compare).
SWEEP_HEADLINE = (
    "val/loss", "perf/step_ms_median", "perf/tokens_per_s_median", "cache/hit_rate",
    "memory/peak_allocated_mb", "memory/peak_rss_mb",
    "bench/cases_ok", "bench/cases_oom", "bench/cases_error",
)
METRICS: dict[str, Metric] = {m.name: m for m in (*CACHE_METRICS, *POOL_METRICS, *TRAIN_METRICS, *BENCH_METRICS)}
CACHE_STATS = tuple(m.name.removeprefix(CACHE_PREFIX) for m in CACHE_METRICS)
CACHE_COUNTERS = frozenset(m.name.removeprefix(CACHE_PREFIX) for m in CACHE_METRICS if m.kind == COUNTER)
POOL_COUNTERS = frozenset(m.name.removeprefix(POOL_PREFIX) for m in POOL_METRICS if m.kind == COUNTER)
# Names bench rows had before they took training's: cache_<stat>, pool_<stat>.
OLD_NAMES: dict[str, str] = {
    **{f"cache_{m.name.removeprefix(CACHE_PREFIX)}": m.name for m in CACHE_METRICS},
    **{f"pool_{m.name.removeprefix(POOL_PREFIX)}": m.name for m in POOL_METRICS},
}


def cache_metric(stat: str) -> str:
    """The name of a pattern-cache statistic: ``hit_rate`` -> ``cache/hit_rate``."""
    return CACHE_PREFIX + stat


def pool_metric(stat: str) -> str:
    """The name of a buffer-pool statistic: ``requests`` -> ``memory/pool_requests``."""
    return POOL_PREFIX + stat


def canonical(name: str) -> str:
    """Today's name of a metric that may carry an old bench name (``cache_hit_rate`` -> ``cache/hit_rate``)."""
    return OLD_NAMES.get(name, name)


def canonical_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row or metrics dict with old bench names renamed; a today's name present wins."""
    out = dict(row)
    for old, new in OLD_NAMES.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def label(name: str) -> str:
    """The short column title of a metric; an unknown name is its own title."""
    m = METRICS.get(canonical(name))
    return m.label if m is not None else name


def labels(names: Iterable[str]) -> dict[str, str]:
    return {n: label(n) for n in names}


def kind(name: str) -> str:
    """``counter`` or ``level``; an unknown name is a level (reported as it stands)."""
    m = METRICS.get(canonical(name))
    return m.kind if m is not None else LEVEL


def unit(name: str) -> str:
    m = METRICS.get(canonical(name))
    return m.unit if m is not None else ""
