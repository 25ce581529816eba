"""The command line of `python -m dilexp.compare`."""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from dilexp.compare.baseline import apply_baseline
from dilexp.compare.plot import plot
from dilexp.compare.render import render_csv, render_markdown, render_rich
from dilexp.compare.runs import CompareError, find_runs
from dilexp.compare.table import BENCH_METRICS, TRAIN_METRICS, make_tables, short_runs
from dilexp.compare.wandb_source import wandb_runs
from dilexp.telemetry.record import SUMMARY


def _parse_pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CompareError(f"{flag} {text!r}: expected KEY=VALUE, e.g. attention=sdpa")
    return key.lstrip("+"), value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dilexp.compare",
        description="Runs side by side: one row per configuration, only the settings that differ.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="run folders, sweep folders or summary.json files")
    p.add_argument("--metrics", help="comma-separated metric keys; 'a|b' takes a where present, globs expand "
                                     f"(train default: {','.join(TRAIN_METRICS)}; bench: {','.join(BENCH_METRICS)})")
    p.add_argument("--baseline", metavar="KEY=VALUE", help="add a ratio column against this configuration")
    p.add_argument("--ratio-of", metavar="METRIC", help="the metric the ratio is taken of (default: the first)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="keep only these rows")
    p.add_argument("--rows", choices=("main", "all"), default="main",
                   help="bench: only the variant's own rows (main), or the SDPA/compare/matmul rows too (all)")
    p.add_argument("--format", choices=("table", "md", "csv"), help="default: table, or from --out's suffix")
    p.add_argument("--out", type=Path, help="write the table here instead of the terminal")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="plot --y against --x: one line per configuration, bars for a categorical --x")
    p.add_argument("--x", help="plot x: a setting or bench field (default: seq_len; --frontier: a metric, "
                               "perf/tokens_per_s_median)")
    p.add_argument("--y", help="plot y: a metric (default: median_ms; --frontier: val/acc)")
    p.add_argument("--frontier", action="store_true", help="train runs: --y vs --x per configuration, the Pareto "
                                                           "front marked and printed; plot to --plot (frontier.png)")
    p.add_argument("--minimize", action="append", choices=("x", "y"), help="--frontier: lower is better on this axis")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the runs of this W&B project (online only)")
    p.add_argument("--group", help="with --wandb: the W&B group (a sweep's: sweep-<date>_<time>-<suffix>)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the ratio interval")
    p.add_argument("--width", type=int, help="terminal table width (default: the terminal's)")
    args = p.parse_args(argv)
    if not args.paths and not args.wandb:
        p.error("give at least one PATH, or --wandb ENTITY/PROJECT")
    return args


def run(args: argparse.Namespace) -> int:
    runs = find_runs(args.paths) if args.paths else []
    if args.wandb:
        runs += wandb_runs(args.wandb, args.group)
    if not runs:
        raise CompareError(f"no runs found (no {SUMMARY} below {', '.join(map(str, args.paths))})")
    where = [_parse_pair(w, "--where") for w in args.where]
    if args.frontier:
        from dilexp.frontier import run_frontier

        return run_frontier(runs, args, where)
    specs = [s.strip() for s in args.metrics.split(",") if s.strip()] if args.metrics else None
    tables = make_tables(runs, specs, args.rows, where)
    if not tables:
        raise CompareError("no rows left after --where")
    if args.baseline:
        key, value = _parse_pair(args.baseline, "--baseline")
        for t in tables:
            if not any(r.identity.get(key) == value for r in t.rows):
                print(f"dilexp.compare: {t.title}: no row has {key}={value}; no ratios", file=sys.stderr)
                continue
            metric = args.ratio_of or (t.metrics[0] if t.metrics else None)
            if metric is None or metric not in t.metrics:
                raise CompareError(f"--ratio-of {metric!r}: not a metric column of {t.title} ({t.metrics})")
            apply_baseline(t.rows, key, value, metric, n_boot=args.bootstrap)
            t.ratio_of, t.baseline = metric, f"{key}={value}"
            # The baseline key stays a column even when only it differs: the ratio needs it.
            if key not in t.keys:
                t.keys.insert(0, key)
    short_runs(tables)

    fmt = args.format or ({".md": "md", ".csv": "csv"}.get(args.out.suffix.lower(), "table") if args.out else "table")
    if fmt == "table" and args.out is None:
        render_rich(tables, width=args.width)
    else:
        if fmt == "md":
            text = render_markdown(tables)
        elif fmt == "csv":
            text = render_csv(tables)
        else:
            buf = io.StringIO()
            render_rich(tables, file=buf, width=args.width or 200)
            text = buf.getvalue()
        if args.out is None:
            sys.stdout.write(text)
        else:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            print(f"dilexp.compare: wrote {args.out}", file=sys.stderr)
    if args.plot:
        info = plot(tables, args.plot, args.x or "seq_len", args.y or "median_ms")
        what = f"{len(info.lines)} line{'s' if len(info.lines) != 1 else ''}" if info.kind == "lines" else \
            f"bars, {len(info.lines)} series"
        print(f"dilexp.compare: wrote {info.path} ({info.y} vs {info.x}, {what})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except CompareError as e:
        print(f"dilexp.compare: {e}", file=sys.stderr)
        return 2
