"""Cache and pool statistics over one bench case, as row columns named by ``dilexp.metrics``.

A counter is reported as its growth over the case, a level as it stands at the end (the
kind comes from the metrics vocabulary); rates are recomputed over the case's own calls.
"""

from __future__ import annotations

import math
from typing import Any

from dilexp.metrics import CACHE_COUNTERS, POOL_COUNTERS, cache_metric, pool_metric

# The cache statistics a row carries, in column order (lookup_s is a training figure).
CACHE_COLUMNS = ("hits", "misses", "hit_rate", "evictions", "entries", "bytes", "promotions", "demotions",
                 "h2d_copies", "h2d_bytes", "build_s", "hot_entries", "hot_bytes", "cold_entries",
                 "cold_bytes", "pregenerated")


def stats_delta(before: dict[str, float], after: dict[str, float], counters: frozenset[str]) -> dict[str, float]:
    """``after`` with every counter replaced by its growth since ``before``."""
    out = {k: (v - before.get(k, 0.0)) if k in counters else v for k, v in after.items()}
    # Rates over the case's own calls, not over the run so far.
    if "hit_rate" in out:
        calls = out.get("hits", 0.0) + out.get("misses", 0.0)
        out["hit_rate"] = out.get("hits", 0.0) / calls if calls else 0.0
    if "reuse_rate" in out:
        out["reuse_rate"] = out.get("reuses", 0.0) / out["requests"] if out.get("requests") else 0.0
    return out


def cache_columns(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """A case's pattern-cache figures: ``cache/<stat>``."""
    stats = stats_delta(before, after, CACHE_COUNTERS)
    return {cache_metric(k): stats[k] for k in CACHE_COLUMNS if k in stats}


def pool_columns(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """A case's buffer-pool figures: ``memory/pool_<stat>``."""
    return {pool_metric(k): float(v) for k, v in stats_delta(before, after, POOL_COUNTERS).items()}


def pair_columns(group: str, choice: str, main_s: float, other_s: float, main_mem: dict[str, Any],
                 other_mem: dict[str, Any]) -> dict[str, Any]:
    """The main row's columns against its twin built with ``<group>=<choice>``: speedup
    (other median / main median, > 1: main is faster), both peaks, and the peak ratio
    (main / other, <= 1: main holds no more)."""
    tag = f"{group}_{choice}"
    out: dict[str, Any] = {f"compare_{group}": choice}
    if math.isfinite(main_s) and math.isfinite(other_s):
        out[f"speedup_vs_{tag}"] = other_s / main_s
    for key in ("peak_alloc_mb", "peak_held_mb"):
        if key in other_mem:
            out[f"{key}_{tag}"] = other_mem[key]
    a, b = main_mem.get("peak_held_mb", math.nan), other_mem.get("peak_held_mb", math.nan)
    if math.isfinite(a) and math.isfinite(b) and b > 0:
        out[f"peak_vs_{tag}"] = a / b
    return out
