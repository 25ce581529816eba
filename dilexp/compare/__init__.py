"""`python -m dilexp.compare`: runs side by side, from their run records or from W&B.

    python -m dilexp.compare outputs/multirun/2026-11-22/10-00-00-123456-ab12
    python -m dilexp.compare SWEEP --baseline attention=sdpa --format md --out table.md
    python -m dilexp.compare SWEEP --plot time.png --x seq_len --y median_ms
    python -m dilexp.compare SWEEP --frontier    # tok/s x val/acc Pareto front (dilexp.frontier)
    python -m dilexp.compare --wandb my-team/dilexp --group sweep-2026-11-22_10-00-00-123456-ab12

Modules by job: runs (records below folders), wandb_source (--wandb), rows (grouping), baseline
(ratios, bootstrap), table (columns, number format), render (terminal, md, csv), plot, cli.

PATHs are run folders, sweep folders or any folder above them: every summary.json below is a
run. One table row per configuration, the configuration being the job's config choices and
overrides (a seed is not part of it: runs that differ only in the seed are repeats of one
row). task=bench runs give one row per measured case instead. Only the settings that differ
between rows are shown. Failed, unfinished and unreadable runs are rows too, marked so.

``--baseline KEY=VALUE`` divides a metric by the baseline row's (same other settings) and,
where both rows hold repeated measurements (several seeds, or a bench case's ``times_ms``),
gives a bootstrap confidence interval; an interval that contains 1 is "no clear difference".
"""

from __future__ import annotations

from dilexp.compare.baseline import apply_baseline, bootstrap_ratio
from dilexp.compare.cli import main, parse_args, run
from dilexp.compare.plot import PlotInfo, _match_key, plot
from dilexp.compare.render import render_csv, render_markdown, render_rich
from dilexp.compare.rows import Row, _natural_key, build_rows, expand_metrics, varying_keys
from dilexp.compare.runs import CASE_KEYS, NOT_IDENTITY, CompareError, Run, _num, find_runs, settings_of
from dilexp.compare.table import BENCH_METRICS, TRAIN_METRICS, Table, _fmt, make_tables
from dilexp.compare.wandb_source import wandb_runs

__all__ = [
    "BENCH_METRICS", "CASE_KEYS", "NOT_IDENTITY", "TRAIN_METRICS", "CompareError", "PlotInfo", "Row", "Run",
    "Table", "_fmt", "_match_key", "_natural_key", "_num", "apply_baseline", "bootstrap_ratio", "build_rows",
    "expand_metrics", "find_runs", "main", "make_tables", "parse_args", "plot", "render_csv", "render_markdown",
    "render_rich", "run", "settings_of", "varying_keys", "wandb_runs",
]
