"""What a sweep shows: the headline figures of sweep.json and the end-of-sweep table."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from dilexp.metrics import SWEEP_HEADLINE as HEADLINE  # noqa: F401  (re-exported)
from dilexp.metrics import label
from dilexp.sweep_jobs import INDEX, RUN_CONTROL, override_items, status_counts


def headline(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The finite headline figures of a job's metrics (what sweep.json keeps of them)."""
    out: dict[str, float] = {}
    for key in HEADLINE:
        v = (metrics or {}).get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _varying(jobs: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs: the rest says nothing about a row."""
    items = [override_items(j.get("overrides") or []) for j in jobs]
    keys: list[str] = []
    for it in items:
        keys.extend(k for k in it if k not in keys and k not in RUN_CONTROL)
    return [k for k in keys if len({it.get(k) for it in items}) > 1]


def resume_command(index: dict[str, Any], sweep_dir: Path) -> str:
    raw = [o for o in index.get("overrides", []) if override_items([o]).keys() != {"resume"}]
    raw = [o for o in raw if not o.startswith("hydra.sweep.dir=")]
    args = ["python", "-m", "dilexp", "-m", *raw, f"hydra.sweep.dir={sweep_dir}", "+resume=true"]
    return " ".join(shlex.quote(a) for a in args)




def print_sweep_summary(index: dict[str, Any], sweep_dir: Path, max_rows: int = 24) -> None:
    from rich.console import Console
    from rich.table import Table

    jobs = [j for j in index.get("jobs", []) if j.get("last_run")] or list(index.get("jobs", []))
    counts = status_counts(jobs)
    bad = [j for j in jobs if j["status"] != "completed"]
    good = [j for j in jobs if j["status"] == "completed"]
    # Failures always make the screen; completed jobs fill what is left.
    shown = sorted(bad + good[: max(0, max_rows - len(bad))], key=lambda j: (j.get("num") is None, j.get("num")))
    varying = _varying(jobs)
    metric_keys = [k for k in HEADLINE if any(k in (j.get("metrics") or {}) for j in shown)][:3]

    table = Table(title=f"sweep {sweep_dir}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("status", no_wrap=True)
    for k in varying:
        table.add_column(k, overflow="fold")
    if not varying:
        table.add_column("overrides", overflow="fold")
    for k in metric_keys:
        table.add_column(label(k), justify="right")
    table.add_column("folder", overflow="fold")
    style = {"completed": "green", "failed": "bold red"}
    for j in shown:
        items = override_items(j.get("overrides") or [])
        settings = [items.get(k, "-") for k in varying] or [" ".join(j.get("overrides") or [])]
        status = j["status"] + (" (kept)" if j.get("kept") else "")
        cells = [_fmt(j["metrics"][k]) if k in (j.get("metrics") or {}) else "-" for k in metric_keys]
        table.add_row(str(j.get("num", "?")), f"[{style.get(j['status'], 'yellow')}]{status}[/]", *settings,
                      *cells, j["folder"])
    console = Console(stderr=True)
    console.print(table)
    if len(shown) < len(jobs):
        console.print(f"... {len(jobs) - len(shown)} more completed jobs in {sweep_dir / INDEX}")
    ran = counts.get("completed", 0) - counts.get("kept", 0)
    line = f"{len(jobs)} jobs: {ran} completed" + (f", {counts['kept']} kept from an earlier run"
                                                    if counts.get("kept") else "")
    for status in sorted(set(counts) - {"completed", "kept"}):
        line += f", {counts[status]} {status}"
    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    say(line)
    stopped = index.get("interrupted")
    if stopped:
        left = index.get("not_run")
        if stopped.get("jobs_go_on"):
            say(f"interrupted by {stopped['signal']}: the submitted SLURM jobs go on (squeue); once they end, "
                "the resume command below finishes the sweep")
        else:
            say(f"interrupted by {stopped['signal']}: " + (f"{len(left)} jobs did not run (not_run in {INDEX})"
                                                            if left is not None else "the jobs left did not run"))
    for j in bad:
        if j.get("error"):
            say(f"  job {j.get('num')}: {str(j['error'])[:200]}")
    say(f"index:   {sweep_dir / INDEX}")
    say(f"compare: python -m dilexp.compare {sweep_dir}")
    if bad or stopped:
        say(f"resume:  {resume_command(index, sweep_dir)}")
    if any(sweep_dir.glob("*/wandb/offline-run-*")):
        say(f"W&B:     wandb sync {sweep_dir}/*/wandb/offline-run-*")
    if (sweep_dir / "optimization_results.yaml").is_file():
        say(f"optuna:  {sweep_dir / 'optimization_results.yaml'}")
