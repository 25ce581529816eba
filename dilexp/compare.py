"""`python -m dilexp.compare`: runs side by side, from their run records or from W&B.

    python -m dilexp.compare outputs/multirun/2026-11-22/10-00-00-123456-ab12
    python -m dilexp.compare SWEEP --baseline attention=sdpa --format md --out table.md
    python -m dilexp.compare SWEEP --plot time.png --x seq_len --y median_ms
    python -m dilexp.compare SWEEP --frontier    # tok/s x val/acc Pareto front (dilexp.frontier)
    python -m dilexp.compare --wandb my-team/dilexp --group sweep-2026-11-22_10-00-00-123456-ab12

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

import argparse
import csv
import fnmatch
import io
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dilexp.metrics import canonical, canonical_row, label
from dilexp.sweep import RUN_CONTROL, override_items
from dilexp.telemetry.record import SUMMARY

TRAIN_METRICS = ("perf/step_ms_median", "perf/tokens_per_s_median", "memory/peak_allocated_mb|memory/peak_rss_mb",
                 "cache/hit_rate", "val/loss")
BENCH_METRICS = ("median_ms", "tflops", "speedup_vs_sdpa", "peak_alloc_mb", "cache/hit_rate")
# What identifies a bench case inside a run (the rest of a row is measurement).
CASE_KEYS = ("target", "variant", "role", "op", "seq_len", "batch", "heads", "head_dim", "dtype", "mode", "causal",
             "compare_to")
# Keys that never tell configurations apart: a seed makes repeats, the rest steer the run.
NOT_IDENTITY = frozenset({"seed", *RUN_CONTROL})
# Raw repeats behind a bench figure, for the bootstrap.
RAW_SAMPLES = {"median_ms": "times_ms", "median_ns": "times_ns", "per_call_ns": "times_ns"}


class CompareError(Exception):
    """A problem the user can fix (bad argument, nothing found, W&B offline): one line, exit 2."""


# -- runs ------------------------------------------------------------------------------------


@dataclass
class Run:
    path: str
    status: str
    task: str
    settings: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    bench: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def settings_of(choices: dict[str, Any] | None, overrides: Iterable[str]) -> dict[str, str]:
    """A run's configuration: its config-group choices, then its other command-line overrides."""
    out = {str(k): str(v) for k, v in (choices or {}).items()}
    for key, value in override_items(overrides).items():
        if key in NOT_IDENTITY or key.startswith("hydra.") or key in out:
            continue
        out[key] = value
    return out


def _run_from_summary(path: Path) -> Run:
    folder = str(path.parent)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return Run(folder, "corrupt", "?", _settings_from_hydra(path.parent), error=f"{SUMMARY}: {e}")
    bench = data.get("bench")
    return Run(
        folder, str(data.get("status") or "unknown"), str(data.get("task") or "?"),
        settings_of(data.get("choices"), data.get("overrides") or []),
        metrics=data.get("metrics") if isinstance(data.get("metrics"), dict) else {},
        bench=[r for r in bench if isinstance(r, dict)] if isinstance(bench, list) else [],
        error=data.get("error"),
    )


def _settings_from_hydra(folder: Path) -> dict[str, str]:
    try:
        from omegaconf import OmegaConf

        return settings_of({}, [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")])
    except Exception:  # noqa: BLE001 - nothing to go on
        return {}


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run below PATHs: summary.json files, and job folders that never got one."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            files, orphans = [p], []
        elif p.is_dir():
            files = [f for f in p.rglob(SUMMARY) if not _inside_tool_dir(f, p)]
            # A job killed before its record was written still has Hydra's overrides.
            orphans = [h.parent.parent for h in p.rglob(".hydra/overrides.yaml")
                       if not (h.parent.parent / SUMMARY).exists() and not _inside_tool_dir(h.parent, p)]
        else:
            raise CompareError(f"{p}: no such file or folder")
        for f in sorted(files):
            if f.resolve() not in seen:
                seen.add(f.resolve())
                runs.append(_run_from_summary(f))
        for folder in sorted(orphans):
            runs.append(Run(str(folder), "no record", "?", _settings_from_hydra(folder),
                            error="no summary.json (killed before its record was written?)"))
    return runs


def _inside_tool_dir(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts[:-1]
    return any(part in ("wandb", ".submitit", "checkpoints") for part in parts)


# -- W&B -------------------------------------------------------------------------------------


def wandb_runs(project: str, group: str | None) -> list[Run]:
    """Runs of an online W&B project (one group): their tags, config and summary."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if not mode:
        from dilexp.telemetry.wandb_logger import wandb_mode  # imports Lightning: only when needed

        mode = wandb_mode("auto")
    if mode != "online":
        raise CompareError(
            f"--wandb reads runs from the W&B server, and W&B is {mode} here "
            f"({'WANDB_MODE=' + os.environ['WANDB_MODE'] if os.environ.get('WANDB_MODE') else 'not logged in'}). "
            "Compare the local run folders instead (python -m dilexp.compare outputs/multirun/...), "
            "or log in (wandb login), upload them (wandb sync <sweep>/*/wandb/offline-run-*) and retry.")
    try:
        import wandb

        api = wandb.Api(timeout=60)
        found = list(api.runs(project, filters={"group": group} if group else None))
    except Exception as e:  # noqa: BLE001 - network, auth, unknown project: one clear line
        raise CompareError(f"W&B: could not list runs of {project!r} ({type(e).__name__}: {e})") from e
    runs, flat_configs = [], []
    states = {"finished": "completed", "crashed": "failed", "failed": "failed", "killed": "failed"}
    for r in found:
        flat = _flatten(dict(r.config or {}))
        flat_configs.append(flat)
        choices = dict(t.split("=", 1) for t in (r.tags or []) if "=" in t)
        summary = dict(getattr(r, "summary_metrics", None) or {k: r.summary.get(k) for k in r.summary.keys()})
        runs.append(Run(f"wandb:{r.entity}/{r.project}/{r.id} ({r.name})", states.get(r.state, str(r.state)),
                        str(flat.get("task.name", "?")), choices,
                        metrics={k: v for k, v in summary.items() if _num(v) is not None}))
    # Settings that are not config choices (data.seq_len=...) are read off the config itself:
    # the leaves that differ between runs, except under a group whose choice already differs.
    varying_groups = {k for k in {g for r in runs for g in r.settings} if len({r.settings.get(k) for r in runs}) > 1}
    keys = {k for c in flat_configs for k in c}
    for key in sorted(keys):
        if key.split(".")[0] in varying_groups or key.split(".")[0] in ("logger", "group", "experiment_name"):
            continue
        if key in NOT_IDENTITY or len({str(c.get(key)) for c in flat_configs}) < 2:
            continue
        for run, c in zip(runs, flat_configs, strict=True):
            if key in c:
                run.settings[key] = str(c[key])
    return runs


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "value" in v and set(v) <= {"value", "desc"}:
            out[key] = v["value"]  # the server's raw form wraps each value as {"value": ..., "desc": ...}
        elif isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# -- rows ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table row: a configuration (and a bench case), over its repeats."""

    identity: dict[str, str]
    status: str
    values: dict[str, float]
    samples: dict[str, list[float]]
    runs: list[str]
    n: int
    error: str | None = None
    ratio: float | None = None
    ci: tuple[float, float] | None = None
    note: str = ""


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # "inf" and numeric strings from summary.json
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class _Record:
    identity: dict[str, str]
    status: str
    metrics: dict[str, Any]
    raw: dict[str, list[float]]
    run: str
    error: str | None
    measured: bool  # its figures count (a completed run, or a bench case timed before its job died)


def _records(runs: list[Run], kind: str, bench_rows: str) -> list[_Record]:
    out: list[_Record] = []
    for run in runs:
        is_bench = run.task == "bench" or bool(run.bench)
        if (kind == "bench") != is_bench:
            continue
        done = run.status == "completed"
        if not is_bench or not run.bench:
            out.append(_Record(dict(run.settings), run.status, run.metrics, {}, run.path, run.error, done))
            continue
        for row in map(canonical_row, run.bench):  # records from before bench rows took training's names
            if bench_rows == "main" and row.get("role") not in (None, "main"):
                continue
            case = {k: str(row[k]) for k in CASE_KEYS if row.get(k) is not None}
            ok = row.get("status", "ok") == "ok"
            # A bench job writes its rows case by case: a job that died later still timed these.
            status = ("completed" if done else f"partial ({run.status})") if ok else str(row.get("status"))
            raw = {m: [float(x) for x in row[src] if _num(x) is not None]
                   for m, src in RAW_SAMPLES.items() if isinstance(row.get(src), list)}
            out.append(_Record({**run.settings, **case}, status, row, raw, run.path,
                               row.get("error") or (None if done else run.error), ok))
    return out


def build_rows(runs: list[Run], kind: str, metrics: list[str], bench_rows: str = "main") -> list[Row]:
    groups: dict[tuple[tuple[str, str], ...], list[_Record]] = {}
    for rec in _records(runs, kind, bench_rows):
        groups.setdefault(tuple(sorted(rec.identity.items())), []).append(rec)
    rows = []
    for key, recs in groups.items():
        statuses = [r.status for r in recs]
        status = statuses[0] if len(set(statuses)) == 1 else ", ".join(
            f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
        ok = [r for r in recs if r.measured]
        values: dict[str, float] = {}
        samples: dict[str, list[float]] = {}
        for name in metrics:
            per_run = [v for r in ok if (v := _num(r.metrics.get(name))) is not None]
            if not per_run:
                continue
            values[name] = statistics.median(per_run)
            pooled = [x for r in ok for x in r.raw.get(name, [])]
            # Raw repeats of a bench case when there are some; across runs, the per-run figures.
            if len(pooled) >= 2:
                samples[name] = pooled
            elif len(per_run) >= 2:
                samples[name] = per_run
        errors = [r.error for r in recs if r.error]
        rows.append(Row(dict(key), status, values, samples, [r.run for r in recs], len(recs),
                        error=str(errors[0]) if errors else None))
    return rows


def _sort_key(value: str) -> tuple[int, float, str]:
    v = _num(value)
    return (0, v, "") if v is not None else (1, 0.0, value)


def _natural_key(text: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def expand_metrics(specs: Sequence[str], runs: list[Run], kind: str, bench_rows: str) -> list[str]:
    """One metric key per column from specs: ``a|b`` is a where any run has it, else b;
    ``memory/peak_*`` expands to every matching key the runs have."""
    available: set[str] = set()
    for rec in _records(runs, kind, bench_rows):
        available.update(k for k, v in rec.metrics.items() if _num(v) is not None)
    out: list[str] = []
    for spec in specs:
        alts = [canonical(a.strip()) for a in spec.split("|") if a.strip()]
        if len(alts) == 1 and any(ch in alts[0] for ch in "*?["):
            # Natural order: val/acc_dist/2-3 before val/acc_dist/16-31.
            matched = sorted(fnmatch.filter(available, alts[0]), key=_natural_key)
            out.extend(m for m in matched if m not in out)
        elif alts:
            name = next((a for a in alts if a in available), alts[0])
            if name not in out:
                out.append(name)
    return out


def varying_keys(rows: list[Row]) -> list[str]:
    """Settings that differ between rows, without columns that repeat an earlier one."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r.identity if k not in keys)
    varying = [k for k in keys if len({r.identity.get(k) for r in rows}) > 1]
    order = {k: i for i, k in enumerate(CASE_KEYS)}
    # Config settings first, then the bench case in its natural order.
    varying.sort(key=lambda k: (k in order, order.get(k, 0)))
    out: list[str] = []
    for k in varying:
        column = [r.identity.get(k) for r in rows]
        if any(column == [r.identity.get(j) for r in rows] for j in out):
            continue  # e.g. a bench row's variant is the job's attention choice
        out.append(k)
    return out


def _aliases(rows: list[Row], key: str) -> set[str]:
    """Keys that move one-to-one with ``key`` (bench ``variant`` with ``attention``)."""
    out = set()
    keys = {k for r in rows for k in r.identity}
    for other in keys - {key}:
        pairs = {(r.identity.get(key), r.identity.get(other)) for r in rows}
        if len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs}):
            out.add(other)
    return out


def apply_baseline(rows: list[Row], key: str, value: str, metric: str, n_boot: int = 2000,
                   level: float = 0.95) -> None:
    """Ratio of ``metric`` to the baseline row with the same other settings (where both have them)."""
    ignore = {key} | _aliases(rows, key)
    bases = [r for r in rows if r.identity.get(key) == value]
    for row in rows:
        if row.identity.get(key) == value:
            row.note = "baseline"
            row.ratio = 1.0 if metric in row.values else None
            continue
        if key not in row.identity:
            continue
        best, best_shared, tied = None, -1, False
        for b in bases:
            shared = (row.identity.keys() & b.identity.keys()) - ignore
            if any(row.identity[k] != b.identity[k] for k in shared):
                continue
            if len(shared) > best_shared:
                best, best_shared, tied = b, len(shared), False
            elif len(shared) == best_shared:
                tied = True
        if best is None or tied:
            row.note = "no baseline" if best is None else "ambiguous baseline"
            continue
        a, b = row.values.get(metric), best.values.get(metric)
        if a is None or not b:
            row.note = "no value" if row.status == "completed" else ""
            continue
        row.ratio = a / b
        row.ci = bootstrap_ratio(row.samples.get(metric, []), best.samples.get(metric, []), n_boot, level)
        if row.ci is not None and row.ci[0] <= 1.0 <= row.ci[1]:
            row.note = "no clear difference"
        elif row.ci is not None:
            row.note = "lower" if row.ci[1] < 1.0 else "higher"


def bootstrap_ratio(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of median(a) / median(b), resampling each side on its own."""
    import numpy as np

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.size < 2 or xb.size < 2:
        return None
    rng = np.random.default_rng(seed)  # fixed: the same records give the same table
    ma = np.median(xa[rng.integers(0, xa.size, size=(n_boot, xa.size))], axis=1)
    mb = np.median(xb[rng.integers(0, xb.size, size=(n_boot, xb.size))], axis=1)
    ok = mb != 0
    if not ok.any():
        return None
    ratios = ma[ok] / mb[ok]
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(ratios, [tail, 1.0 - tail])
    return float(lo), float(hi)


# -- output ----------------------------------------------------------------------------------




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

    def cells(self, row: Row, fmt: bool = True) -> dict[str, Any]:
        blank = "-" if fmt else ""
        f = _fmt if fmt else (lambda v: v)
        out: dict[str, Any] = {"status": row.status, "n": row.n}
        out.update({k: row.identity.get(k, blank) for k in self.keys})
        out.update({m: f(row.values[m]) if m in row.values else blank for m in self.metrics})
        out["ratio"] = f(row.ratio) if row.ratio is not None else blank
        ci = row.ci
        if fmt:
            out["ci"] = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
        else:
            out["ci_low"], out["ci_high"] = (ci if ci else ("", ""))
        out["note"] = row.note
        where = row.runs[0] + (f" (+{len(row.runs) - 1})" if len(row.runs) > 1 else "")
        if fmt and row.error and row.status != "completed":
            where += f": {row.error[:120]}"
        out["run"] = where
        if not fmt and row.error:
            out["error"] = row.error
        return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _short_runs(tables: list[Table]) -> None:
    """Run folders relative to their common parent: the table says which, not where."""
    paths = [p for t in tables for r in t.rows for p in r.runs if not p.startswith("wandb:")]
    if len(paths) < 2:
        return
    root = os.path.commonpath(paths)
    for t in tables:
        for r in t.rows:
            r.runs = [os.path.relpath(p, root) if not p.startswith("wandb:") else p for p in r.runs]


def render_rich(tables: list[Table], file: Any = None, width: int | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    console = Console(file=file, width=width, highlight=False)
    style = {"completed": "green", "failed": "bold red", "oom": "bold red", "error": "bold red"}
    for t in tables:
        rt = RichTable(title=t.title, title_justify="left", caption=t.caption() or None, caption_justify="left")
        cols = t.columns()
        for name, title in cols:
            numeric = name in t.metrics or name in ("n", "ratio")
            rt.add_column(title, justify="right" if numeric else "left", overflow="fold",
                          no_wrap=name in ("status", "ratio", "ci"))
        for row in t.rows:
            cells = t.cells(row)
            texts = [escape(str(cells[name])) for name, _ in cols]
            texts[0] = f"[{style.get(row.status, 'yellow')}]{texts[0]}[/]"
            if row.note == "no clear difference":
                texts = [f"[yellow]{x}[/]" if name in ("ratio", "ci", "note") else x
                         for (name, _), x in zip(cols, texts, strict=True)]
            rt.add_row(*texts)
        console.print(rt)


def render_markdown(tables: list[Table]) -> str:
    out = []
    for t in tables:
        out.append(f"### {t.title}\n")
        if t.caption():
            out.append(f"{t.caption()}\n")
        cols = t.columns()
        out.append("| " + " | ".join(title for _, title in cols) + " |")
        out.append("|" + "|".join("---:" if name in t.metrics or name == "ratio" else "---" for name, _ in cols) + "|")
        for row in t.rows:
            cells = t.cells(row)
            out.append("| " + " | ".join(str(cells[name]).replace("|", "\\|") for name, _ in cols) + " |")
        out.append("")
    return "\n".join(out)


def render_csv(tables: list[Table]) -> str:
    """Every table in one CSV, full precision, metric keys as column names."""
    header: list[str] = ["table"]
    for t in tables:
        for name, _ in t.columns():
            names = ["ci_low", "ci_high"] if name == "ci" else [name]
            header += [n for n in names if n not in header]
    if any(r.error for t in tables for r in t.rows):
        header.append("error")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for t in tables:
        for row in t.rows:
            cells = t.cells(row, fmt=False)
            w.writerow([t.kind] + [cells.get(h, "") for h in header[1:]])
    return buf.getvalue()


# -- plot ------------------------------------------------------------------------------------


def _match_key(name: str, keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if name in keys:
        return name
    hits = [k for k in keys if k.split(".")[-1] == name or k.split("/")[-1] == name]
    return hits[0] if len(hits) == 1 else None


@dataclass
class PlotInfo:
    path: Path
    x: str
    y: str
    lines: list[str]
    xscale: str
    yscale: str


def plot(tables: list[Table], out: Path, x: str, y: str) -> PlotInfo:
    """``y`` against ``x``, one line per configuration; an axis is logarithmic where its data
    spans a decade or more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for t in tables:
        xk = _match_key(x, {k for r in t.rows for k in r.identity})
        yk = _match_key(y, {k for r in t.rows for k in r.values})
        if xk and yk:
            break
    else:
        raise CompareError(f"--plot: no table has both x={x!r} (a setting or bench field) and y={y!r} (a metric; "
                           f"add it with --metrics if it is not a column)")
    rows = [r for r in t.rows if yk in r.values and _num(r.identity.get(xk)) is not None]
    if not rows:
        raise CompareError(f"--plot: no completed row has both {xk} and {yk}")
    ignore = {xk} | _aliases(t.rows, xk)
    label_keys = [k for k in varying_keys(t.rows) if k not in ignore]
    lines: dict[str, list[Row]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r.identity[k]}" for k in label_keys if k in r.identity) or yk
        lines.setdefault(label, []).append(r)

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    xs_all, ys_all = [], []
    for label, pts in sorted(lines.items()):
        pts.sort(key=lambda r: _num(r.identity[xk]) or 0.0)
        xs = [_num(r.identity[xk]) for r in pts]
        ys = [r.values[yk] for r in pts]
        # Spread of the repeats (quartiles) where there are some.
        lo = [y - _quantile(r.samples.get(yk), 0.25, y) for r, y in zip(pts, ys, strict=True)]
        hi = [_quantile(r.samples.get(yk), 0.75, y) - y for r, y in zip(pts, ys, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        xs_all += xs
        ys_all += ys
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    for axis, values in ((ax.xaxis, xs_all), (ax.yaxis, ys_all)):
        positive = [v for v in values if v is not None and v > 0]
        if len(positive) == len(values) and positive and max(positive) / min(positive) >= 10:
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
    distinct = sorted({v for v in xs_all if v is not None})
    if len(distinct) <= 12:
        # Few settings (sequence lengths, head counts): tick exactly those.
        ax.set_xticks(distinct)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xk)
    ax.set_ylabel(yk + ("  (bars: quartiles of repeats)" if any(r.samples.get(yk) for r in rows) else ""))
    ax.set_title(f"{yk} vs {xk}", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    info = PlotInfo(out, xk, yk, sorted(lines), ax.get_xscale(), ax.get_yscale())
    plt.close(fig)
    return info


def _quantile(samples: list[float] | None, q: float, default: float) -> float:
    if not samples or len(samples) < 2:
        return default
    import numpy as np

    return float(np.quantile(samples, q))


# -- command line ----------------------------------------------------------------------------


def make_tables(runs: list[Run], metric_specs: Sequence[str] | None, bench_rows: str = "main",
                where: Sequence[tuple[str, str]] = ()) -> list[Table]:
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
        # Default columns nobody has are noise; asked-for ones stay, to show they are missing.
        names = [m for m in metrics if metric_specs or any(m in r.values for r in rows)]
        keys = varying_keys(rows)
        rows.sort(key=lambda r: [_sort_key(r.identity.get(k, "")) for k in keys])
        evals = any(r.task == "eval" for r in runs)
        title = ("train and eval runs" if evals else "train runs") if kind == "train" else \
            "bench cases" + ("" if bench_rows == "all" else " (role=main)")
        tables.append(Table(title, kind, keys, names, rows))
    return tables


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
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="plot --y against --x, one line per configuration")
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
    _short_runs(tables)

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
        print(f"dilexp.compare: wrote {info.path} ({info.y} vs {info.x}, {len(info.lines)} lines)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except CompareError as e:
        print(f"dilexp.compare: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
