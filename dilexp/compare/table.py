"""What a table holds: its rows, setting columns and metric columns, and how a cell reads."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dilexp.compare.rows import Row, _sort_key, build_rows, expand_metrics, varying_keys
from dilexp.compare.runs import Run
from dilexp.metrics import label

TRAIN_METRICS = ("perf/step_ms_median", "perf/tokens_per_s_median", "memory/peak_allocated_mb|memory/peak_rss_mb",
                 "cache/hit_rate", "val/loss")
BENCH_METRICS = ("median_ms", "tflops", "speedup_vs_sdpa", "peak_alloc_mb", "cache/hit_rate")

# Bench rows that are the machine's yardstick, not a case of the sweep (the matmul): a table of
# their own, and a level across a plot, never a point on its N axis.
REFERENCE_ROLES = frozenset({"reference"})
# A completed row without a figure: the configuration does not have it (sdpa's cache hit rate).
NOT_APPLICABLE = "n/a"


def _fmt(value: float | None) -> str:
    """One number format for people: 3 significant digits, thousands separators, no exponent
    between 0.001 and 10^15 (34,500 and 0.0523, never 3.45e+04 beside 4e+04)."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if not -3 <= magnitude < 15:
        return f"{value:.2e}"
    digits = 2 - magnitude  # negative: rounds to tens, hundreds, ...
    text = f"{round(value, digits):,.{max(0, digits)}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


@dataclass
class Table:
    title: str
    kind: str
    keys: list[str]
    metrics: list[str]
    rows: list[Row]
    ratio_of: str | None = None
    baseline: str | None = None

    def columns(self) -> list[tuple[str, str]]:
        """(name, title) of each column; optional ones only when some row fills them."""
        cols = [("status", "status")]
        if any(r.n > 1 for r in self.rows):
            cols.append(("n", "n"))
        cols += [(k, k) for k in self.keys]
        # Short titles for people (md and terminal); CSV keeps the metric keys.
        cols += [(m, label(m)) for m in self.metrics]
        if self.ratio_of:
            cols.append(("ratio", "ratio"))
            if any(r.ci for r in self.rows):
                cols.append(("ci", "95% CI"))
            if any(r.note for r in self.rows):
                cols.append(("note", "note"))
        return cols + [("run", "run")]

    def caption(self) -> str:
        if not self.ratio_of:
            return ""
        return (f"ratio: {self.ratio_of} / the same of {self.baseline} with the same other settings; "
                "95% CI: bootstrap over repeats (seeds, or a bench case's timings)")

    def cells(self, row: Row, fmt: bool = True, errors: bool = True) -> dict[str, Any]:
        """The row's cells: formatted for people (``fmt``), or raw for CSV. ``errors=False``
        leaves a failed row's error out of its run cell (the terminal prints it below the table)."""
        measured = row.status == "completed" or row.status.startswith("partial")
        blank = "-" if fmt else ""
        f = _fmt if fmt else (lambda v: v)
        out: dict[str, Any] = {"status": row.status, "n": row.n}
        out.update({k: row.identity.get(k, blank) for k in self.keys})
        missing = NOT_APPLICABLE if fmt and measured else blank
        out.update({m: f(row.values[m]) if m in row.values else missing for m in self.metrics})
        out["ratio"] = f(row.ratio) if row.ratio is not None else blank
        ci = row.ci
        if fmt:
            out["ci"] = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
        else:
            out["ci_low"], out["ci_high"] = (ci if ci else ("", ""))
        out["note"] = row.note
        where = row.runs[0] + (f" (+{len(row.runs) - 1})" if len(row.runs) > 1 else "")
        if fmt and errors and row.error and row.status != "completed":
            where += f": {row.error[:120]}"
        out["run"] = where
        if not fmt and row.error:
            out["error"] = row.error
        return out


def short_runs(tables: list[Table]) -> None:
    """Run folders cut to the part that tells them apart: relative to their common parent
    (a sweep's jobs read 0, 1, ...), a lone run by its own folder name."""
    paths = {p for t in tables for r in t.rows for p in r.runs if not p.startswith("wandb:")}
    if not paths:
        return
    root = os.path.commonpath(sorted(paths))
    if len(paths) == 1:
        root = os.path.dirname(root)
    for t in tables:
        for r in t.rows:
            r.runs = [os.path.relpath(p, root) if not p.startswith("wandb:") else p for p in r.runs]


def make_tables(runs: list[Run], metric_specs: Sequence[str] | None, bench_rows: str = "main",
                where: Sequence[tuple[str, str]] = ()) -> list[Table]:
    """A train table and a bench table (those that have rows), with only the settings that vary."""
    tables = []
    for kind in ("train", "bench"):
        if not any(((r.task == "bench" or bool(r.bench)) == (kind == "bench")) for r in runs):
            continue
        specs = list(metric_specs) if metric_specs else list(TRAIN_METRICS if kind == "train" else BENCH_METRICS)
        metrics = expand_metrics(specs, runs, kind, bench_rows)
        rows = [r for r in build_rows(runs, kind, metrics, bench_rows)
                if all(r.identity.get(k) == v for k, v in where)]
        if not rows:
            continue
        evals = any(r.task == "eval" for r in runs)
        title = ("train and eval runs" if evals else "train runs") if kind == "train" else \
            "bench cases" + ("" if bench_rows == "all" else " (role=main)")
        refs = [r for r in rows if r.identity.get("role") in REFERENCE_ROLES]
        cases = [r for r in rows if r not in refs]
        for part, part_title in ((cases, title), (refs, "reference rows (the machine's roof)")):
            if part:
                tables.append(_table(part_title, kind, part, metrics, bool(metric_specs)))
    return tables


def _table(title: str, kind: str, rows: list[Row], metrics: list[str], asked: bool) -> Table:
    # Default columns nobody has are noise; asked-for ones stay, to show they are missing.
    names = [m for m in metrics if asked or any(m in r.values for r in rows)]
    keys = varying_keys(rows)
    rows.sort(key=lambda r: [_sort_key(r.identity.get(k, "")) for k in keys])
    return Table(title, kind, keys, names, rows)
