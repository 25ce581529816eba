"""Bench rows -> bench.csv, a rich table, flat metrics, and the run's loggers (CSV, W&B).

A row is a flat dict (see ``dilexp.tasks.bench``), its statistics named as in training
(``dilexp.metrics``: ``cache/hit_rate``, ``memory/pool_requests``); rows of different targets may have
different keys, so files take the union of the keys, in a fixed order for the known ones.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dilexp.telemetry.loggers import RunLoggers

# Known columns first, in reading order; anything else follows, sorted.
COLUMNS: tuple[str, ...] = (
    "target", "variant", "role", "op", "seq_len", "batch", "heads", "head_dim", "dtype", "mode", "causal",
    "device", "cache_strategy", "memory_kind", "status", "error",
    "median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms",
    "per_call_ns", "median_ns", "p25_ns", "p75_ns", "min_ns", "max_ns",
    "warmup", "repeats", "calls_per_repeat",
    "allowed_pairs", "density", "flop_count", "flops", "tflops", "gflops", "frac_of_matmul", "tokens_per_s",
    "speedup_vs_sdpa", "compare_to", "speedup_vs_compare", "compare_cache", "compare_memory",
    "peak_alloc_mb", "peak_alloc_source", "peak_held_mb", "pool_idle_mb", "cache_held_mb", "peak_reserved_mb",
    "rss_delta_mb", "peak_rss_since_reset_mb", "pattern_bytes",
)
# Columns named after the compared option (speedup_vs_cache_none, peak_vs_memory_none,
# peak_held_mb_memory_none, ...): they follow the known columns, before the counters.
PAIR_PREFIXES = ("speedup_vs_cache_", "speedup_vs_memory_", "peak_vs_cache_", "peak_vs_memory_",
                 "peak_alloc_mb_cache_", "peak_alloc_mb_memory_", "peak_held_mb_cache_", "peak_held_mb_memory_")
LIST_COLUMNS = ("times_ms", "times_ns")


def columns_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: set[str] = set()
    for r in rows:
        seen.update(r)
    known = [c for c in COLUMNS if c in seen]
    rest = sorted(seen - set(COLUMNS) - set(LIST_COLUMNS))
    pair = [c for c in rest if c.startswith(PAIR_PREFIXES)]
    rest = [c for c in rest if c not in pair]
    # Raw timings last: the longest cells, read by scripts rather than people.
    return known + pair + rest + [c for c in LIST_COLUMNS if c in seen]


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return json.dumps([float(f"{v:.6g}") for v in value])
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def write_csv(rows: list[dict[str, Any]], path: Path) -> list[str]:
    cols = columns_of(rows)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})
    tmp.replace(path)
    return cols


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# Per-row figures worth a metric; the full row stays in summary.json and bench.csv.
METRIC_FIELDS = (
    "median_ms", "p25_ms", "p75_ms", "min_ms", "per_call_ns", "tflops", "gflops", "frac_of_matmul",
    "tokens_per_s", "speedup_vs_sdpa", "speedup_vs_compare", "peak_alloc_mb", "peak_held_mb", "cache/hit_rate",
    "cache/misses", "memory/pool_reuse_rate",
)
# Per-row ratios against a twin with another cache or pool, named after it.
METRIC_PREFIXES = ("speedup_vs_cache_", "speedup_vs_memory_", "peak_vs_cache_", "peak_vs_memory_")


def variant_label(row: dict[str, Any]) -> str:
    """The variant, told apart from its twin built with another cache or pool
    (``dilated+cache_none``): both rows have the same variant, and metric keys must not collide."""
    variant = str(row.get("variant"))
    if row.get("role") == "compare_cache":
        return f"{variant}+cache_{row.get('cache_strategy')}"
    if row.get("role") == "compare_memory":
        return f"{variant}+memory_{row.get('memory_kind')}"
    return variant


def row_prefix(row: dict[str, Any]) -> str:
    parts = ["bench", str(row.get("target")), variant_label(row)]
    if row.get("op"):
        parts.append(str(row["op"]))
    parts.append(f"n{row.get('seq_len')}")
    return "/".join(parts)


def case_prefix(row: dict[str, Any]) -> str:
    """Per-case metric keys without the N (the step tells the case): ``<target>/<variant>[/<op>]``."""
    return "/".join(str(x) for x in (row.get("target"), variant_label(row), row.get("op")) if x)


def row_metrics(row: dict[str, Any], prefix: str | None = None) -> dict[str, float]:
    """Flat float metrics of one row: ``bench/<target>/<variant>[/<op>]/n<seq_len>/<field>``."""
    prefix = prefix or row_prefix(row)
    out = {f"{prefix}/ok": 1.0 if row.get("status") == "ok" else 0.0}
    keys = [*METRIC_FIELDS, *sorted(k for k in row if k.startswith(METRIC_PREFIXES))]
    for k in keys:
        v = _num(row.get(k))
        if v is not None and math.isfinite(v):
            out[f"{prefix}/{k}"] = v
    return out


def summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        out.update(row_metrics(r))
    for status in ("ok", "oom", "error"):
        out[f"bench/cases_{status}"] = float(sum(r.get("status") == status for r in rows))
    return out


def _fmt(value: Any, spec: str) -> str:
    v = _num(value)
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """A console table of the headline figures (the CSV has everything)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency; a bare environment still gets the CSV
        return
    cache_rows = any(r.get("target") == "cache" for r in rows)
    # e.g. speedup_vs_cache_none -> a "x cache_none" column, only in runs that have it.
    pair_keys = sorted({k for r in rows for k in r if k.startswith(("speedup_vs_cache_", "speedup_vs_memory_"))})
    table = Table(title=title, title_justify="left")
    heads = ["variant", "op" if cache_rows else "role", "N", "status"]
    # The FLOP count (DESIGN section 8) the rows use: kernel (attention) or model.
    counts = sorted({str(r["flop_count"]) for r in rows if r.get("flop_count")})
    gflops = "GFLOP/s" + (f" ({'/'.join(counts)})" if counts else "")
    heads += ["ns/call", "p25-p75 ns"] if cache_rows else ["median ms", "p25-p75 ms", gflops, "x sdpa", "x cmp"]
    heads += [f"x {k.removeprefix('speedup_vs_')}" for k in pair_keys]
    heads += ["cache hit"] if cache_rows else ["peak alloc MB", *(["peak held MB"] if pair_keys else []),
                                               "cache hit"]
    for h in heads:
        table.add_column(h, justify="left" if h in ("variant", "op", "role", "status") else "right")
    for r in rows:
        status = str(r.get("status"))
        if status != "ok":
            status = f"[red]{status}[/red]"
        cells = [variant_label(r), str(r.get("op") if cache_rows else r.get("role")), str(r.get("seq_len")),
                 status]
        if cache_rows:
            cells += [_fmt(r.get("per_call_ns"), ".0f"),
                      f"{_fmt(r.get('p25_ns'), '.0f')}-{_fmt(r.get('p75_ns'), '.0f')}"]
        else:
            cells += [_fmt(r.get("median_ms"), ".2f"),
                      f"{_fmt(r.get('p25_ms'), '.2f')}-{_fmt(r.get('p75_ms'), '.2f')}",
                      _fmt(r.get("gflops"), ".1f"), _fmt(r.get("speedup_vs_sdpa"), ".2f"),
                      _fmt(r.get("speedup_vs_compare"), ".2f")]
        cells += [_fmt(r.get(k), ".3f") for k in pair_keys]
        hit = _num(r.get("cache/hit_rate"))
        lookups = (_num(r.get("cache/hits")) or 0.0) + (_num(r.get("cache/misses")) or 0.0)
        if not cache_rows:
            cells.append(_fmt(r.get("peak_alloc_mb"), ".1f"))
            if pair_keys:
                cells.append(_fmt(r.get("peak_held_mb"), ".1f"))
        cells.append("-" if hit is None or not lookups else f"{100 * hit:.1f}%")
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:
        # Logs and pipes get rich's 80 columns, too narrow for the figures: widen rather than wrap.
        console = Console(width=160)
    console.print(table)


class BenchLoggers(RunLoggers):
    """The bench run's loggers (dilexp.telemetry.loggers.RunLoggers), with the rows as a W&B table."""

    def log_table(self, rows: list[dict[str, Any]], key: str = "bench/table") -> None:
        if not rows:
            return
        cols = columns_of(rows)
        data = [[_cell(r.get(c)) if r.get(c) is not None else None for c in cols] for r in rows]
        # A column mixing numbers and "" would make wandb.Table guess a string type.
        self.log_wandb_table(key, cols, [[None if v == "" else v for v in row] for row in data])
