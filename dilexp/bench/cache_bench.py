"""task=bench bench.target=cache: ``get_or_build`` of a pattern-cache strategy, timed per call.

On a realistic key and pattern (the first branch of the attention's pattern at each N): a hit
(served on the CPU, so no device copy), a miss (fresh key: lookup + build + insert), the build
alone, the bare call overhead of the timing loop, and on a GPU a hit served on the device.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from dilexp.attention import Attention
from dilexp.bench.settings import BenchSettings
from dilexp.bench.stats import cache_columns
from dilexp.bench.timing import is_oom, spread
from dilexp.cache import PatternCache, build_cache, pattern_nbytes
from dilexp.patterns.dilated import DilatedPattern
from dilexp.patterns.gather import gather_entry, positions_entry


def per_call_ns(calls: int, repeats: int, warmup: int, batch: Callable[[], None],
                 setup: Callable[[], None] | None = None) -> list[float]:
    """Per-call ns of ``batch`` (``calls`` calls), one figure per repeat; GC off while timing,
    as timeit does, so a collection does not land in one batch."""
    out: list[float] = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        gc_was = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter_ns()
            batch()
            dt = time.perf_counter_ns() - t0
        finally:
            if gc_was:
                gc.enable()
        if i >= warmup:
            out.append(dt / calls)
    return out


def realistic_pattern(attn: Attention | None, n: int, causal: bool) -> tuple[tuple[Any, ...], Callable[[], Any]]:
    """The key and build of the plan a dilated attention looks up at N (patterns/gather.py)."""
    pattern = getattr(attn, "pattern", None)
    if isinstance(pattern, DilatedPattern) and attn is not None:
        return gather_entry(pattern, n, attn.num_heads, causal)
    return positions_entry(n, n, 1, 0)  # full attention: one segment, every position


def cache_rows(s: BenchSettings, device: torch.device, attn: Attention | None, strategy: str,
               settings: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """One row per operation of the configured cache at N, each with its median per-call ns
    and the cache counters of that operation alone (a hit batch must show only hits)."""
    cache: PatternCache = build_cache(strategy, **settings)
    cache.clear()
    key, build = realistic_pattern(attn, n, s.causal)
    cpu = torch.device("cpu")
    base = {"target": "cache", "variant": strategy, "role": "main", "seq_len": n, "device": str(device),
            "warmup": s.warmup, "repeats": s.repeats, "status": "ok"}
    get = cache.get_or_build
    hits, misses = s.cache_calls, s.cache_miss_calls

    def hit_batch() -> None:
        for _ in range(hits):
            get(key, build, cpu)

    def noop(key: Any, build: Any, device: Any) -> None:
        return None

    def overhead_batch() -> None:
        for _ in range(hits):
            noop(key, build, cpu)

    fresh = iter(range(1 << 62))

    def miss_batch() -> None:
        # A key never seen: the full miss path (lookup, build, insert, any eviction).
        for _ in range(misses):
            get((*key, "miss", next(fresh)), build, cpu)

    def build_batch() -> None:
        for _ in range(misses):
            build()

    ops: list[tuple[str, int, Callable[[], None], Callable[[], None] | None]] = [
        ("hit", hits, hit_batch, lambda: get(key, build, cpu)),
        ("miss", misses, miss_batch, cache.clear),
        ("build", misses, build_batch, None),
        ("call_overhead", hits, overhead_batch, None),
    ]
    if device.type == "cuda":
        dev = device

        def device_hit_batch() -> None:
            for _ in range(hits):
                get(key, build, dev)
            torch.cuda.synchronize(dev)

        ops.append(("hit_on_device", hits, device_hit_batch, lambda: get(key, build, dev)))

    rows = []
    for op, calls, batch, setup in ops:
        row = {**base, "op": op, "calls_per_repeat": calls, "pattern_bytes": pattern_nbytes(build())}
        before = cache.stats()
        try:
            times = per_call_ns(calls, s.repeats, s.warmup, batch, setup)
            row.update(spread(times, "ns"))
            row["per_call_ns"] = row["median_ns"]
        except Exception as e:  # noqa: BLE001
            row["status"], row["error"] = ("oom" if is_oom(e) else "error"), f"{type(e).__name__}: {e}"[:500]
        # The counters of this op alone: they show that a "hit" batch really hit.
        row.update(cache_columns(before, cache.stats()))
        rows.append(row)
    cache.clear()
    return rows

