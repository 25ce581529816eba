"""Sweeps that survive failure: the sweep index, resume, job folders and Optuna's objective.

conf/config.yaml wires this module into Hydra:

- ``hydra.callbacks.sweep_index`` -> :class:`SweepIndex`: writes ``sweep.json`` in the sweep
  folder (one entry per job: num, overrides, status, folder, headline metrics), updated as
  each job ends, and prints a one-screen table when the sweep ends.
- ``hydra.sweep.dir`` ends in ``${dilexp.uid:}``: a short random suffix after the microsecond
  timestamp, so two sweeps never share a folder, even when started at once on two hosts.
- ``hydra.sweep.subdir: ${dilexp.job_subdir:${hydra.job.num}}``: a job's folder is its number,
  unless that folder holds a *different* job from an earlier run of the sweep (then ``<num>_1``
  ...); with ``+resume=true`` it is the folder of the completed job with the same overrides.
- ``hydra.output_subdir: ${dilexp.hydra_subdir:}``: a job kept by resume does not get its
  ``.hydra/`` rewritten, so the record of what it ran with stays true.

Importing this module registers the resolvers; Hydra imports it when it instantiates the
callback, which happens before it resolves any folder (in the submitting process and, with
submitit, in each job's process when the pickled callback is loaded).

Job identity and folders live in ``dilexp.sweep_jobs``, the headline figures and the
end-of-sweep table in ``dilexp.sweep_table``; their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dilexp.sweep_jobs import (  # noqa: F401  (re-exported: the sweep's public names stay here)
    INDEX,
    RUN_CONTROL,
    find_job_folder,
    job_folders,
    job_record,
    load_index,
    override_items,
    same_job,
    status_counts,
    sweep_axes,
    swept_keys,
    truthy,
)
from dilexp.sweep_table import HEADLINE, headline, print_sweep_summary, resume_command  # noqa: F401
from dilexp.telemetry.record import SUMMARY, read_summary, write_json_atomic

log = logging.getLogger(__name__)

# Jobs kept by resume in this process, so on_job_end (same process as the job) can say so.
_KEPT: set[str] = set()
# The sweep this process is running (set when it starts), its planned jobs (the basic sweeper's
# grid, as override lists) and the job now running: what an interrupted sweep records.
_ACTIVE: dict[str, Any] = {}



def _is_multirun(root: DictConfig) -> bool:
    from hydra.types import RunMode

    return root.hydra.get("mode") == RunMode.MULTIRUN


def _resolve_job_subdir(num: Any, *, _root_: DictConfig) -> str:
    overrides = [str(o) for o in _root_.hydra.overrides.task]
    name, _ = find_job_folder(Path(str(_root_.hydra.sweep.dir)), num, overrides, truthy(_root_.get("resume")))
    return name


def _resolve_hydra_subdir(*, _root_: DictConfig) -> str | None:
    # None tells Hydra not to write .hydra/ at all: a kept job's record stays as it ran.
    if not _is_multirun(_root_) or not truthy(_root_.get("resume")):
        return ".hydra"
    overrides = [str(o) for o in _root_.hydra.overrides.task]
    _, kept = find_job_folder(Path(str(_root_.hydra.sweep.dir)), _root_.hydra.job.num, overrides, True)
    return None if kept else ".hydra"


def _register_resolvers() -> None:
    # use_cache: every job of a sweep gets the master config's value (Hydra copies the cache).
    if not OmegaConf.has_resolver("dilexp.uid"):
        OmegaConf.register_new_resolver("dilexp.uid", lambda: secrets.token_hex(2), use_cache=True)
    if not OmegaConf.has_resolver("dilexp.job_subdir"):
        OmegaConf.register_new_resolver("dilexp.job_subdir", _resolve_job_subdir)
    if not OmegaConf.has_resolver("dilexp.hydra_subdir"):
        OmegaConf.register_new_resolver("dilexp.hydra_subdir", _resolve_hydra_subdir)


_register_resolvers()


# -- what run_job and _hydra_main need -------------------------------------------------------


def kept_result(run_dir: Path, sweep_dir: Path | None, overrides: list[str]) -> dict[str, Any] | None:
    """The result of a job that a resume keeps (completed earlier, same overrides), else None."""
    summary = read_summary(run_dir)
    if summary is None or summary.get("status") != "completed":
        return None
    axes = sweep_axes(sweep_dir) if sweep_dir is not None else None
    if not same_job([str(o) for o in summary.get("overrides") or []], overrides, axes):
        return None
    _KEPT.add(str(Path(run_dir).resolve()))
    result = {k: summary[k] for k in ("metrics", "bench", "cache_keys") if k in summary}
    result["kept"] = True
    return result


def objective(cfg: DictConfig, result: dict[str, Any] | None) -> float | None:
    """The value a sweeper optimises: ``optimized_metric`` looked up in the job's metrics.

    None when no metric is asked for, or the job failed (Optuna then records a failed trial
    and, with ``max_failure_rate: 1.0``, goes on).
    """
    name = cfg.get("optimized_metric")
    if not name or result is None:
        return None
    metrics = result.get("metrics") or {}
    value = metrics.get(str(name))
    if value is None:
        near = sorted(k for k in metrics if str(name).split("/")[0] in k)[:12]
        log.warning("optimized_metric=%s is not among the job's metrics (some are: %s)", name, near)
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- the index -------------------------------------------------------------------------------



def job_entry(folder: Path, sweep_dir: Path) -> dict[str, Any]:
    """What the index says about one job folder, read from its own record."""
    summary = read_summary(folder)
    status, overrides = job_record(folder)
    entry: dict[str, Any] = {
        "num": _job_num(folder),
        "folder": os.path.relpath(folder, sweep_dir),
        "overrides": overrides or [],
        "status": status or ("corrupt" if (folder / SUMMARY).exists() else "no record"),
    }
    if summary is not None:
        for key in ("error", "wall_s", "started_at", "finished_at", "task"):
            if summary.get(key) is not None:
                entry[key] = summary[key]
        entry["metrics"] = headline(summary.get("metrics"))
    return entry


def _job_num(folder: Path) -> int | None:
    # The number the job ran as (Hydra's record), which is the folder name unless it moved.
    try:
        return int(OmegaConf.select(OmegaConf.load(folder / ".hydra" / "hydra.yaml"), "hydra.job.num"))
    except Exception:  # noqa: BLE001 - no or torn Hydra record: fall back to the name
        head = folder.name.split("_")[0]
        return int(head) if head.isdigit() else None


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """Serialise index updates of jobs that end at once (parallel launchers, SLURM arrays)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".sweep.lock", "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows, some network file systems): best effort
            pass
        yield



def _upsert(index: dict[str, Any], entry: dict[str, Any]) -> None:
    jobs = index.setdefault("jobs", [])
    for i, j in enumerate(jobs):
        if j.get("folder") == entry["folder"]:
            jobs[i] = {**j, **entry}
            return
    jobs.append(entry)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def rebuild_index(sweep_dir: Path, finished: bool = False) -> dict[str, Any]:
    """Re-read every job folder into sweep.json (the folders are the truth; the index a view)."""
    with _locked(sweep_dir):
        index = load_index(sweep_dir)
        old = {j.get("folder"): j for j in index.get("jobs", [])}
        jobs = []
        for folder in job_folders(sweep_dir):
            entry = job_entry(folder, sweep_dir)
            prev = old.get(entry["folder"], {})
            # Which jobs this run touched, and which it kept, only the job-end hook knew.
            for key in ("num", "kept", "last_run"):
                if key in prev:
                    entry[key] = prev[key]
            entry.setdefault("last_run", False)
            entry.setdefault("kept", False)
            jobs.append(entry)
        index["jobs"] = jobs
        index["counts"] = status_counts([j for j in jobs if j["last_run"]])
        if finished:
            index["finished_at"] = _now()
        write_json_atomic(sweep_dir / INDEX, index)
    return index


class SweepIndex(Callback):
    """Hydra callback: sweep.json as jobs end, and a one-screen summary when the sweep ends."""

    def __init__(self, max_rows: int = 24, print_summary: bool = True) -> None:
        self.max_rows = int(max_rows)
        self.print_summary = bool(print_summary)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        with _locked(sweep_dir):
            index = load_index(sweep_dir)
            overrides = [str(o) for o in config.hydra.overrides.task]
            index.update({
                "sweep_dir": str(sweep_dir),
                "command": _command_line(),
                "overrides": overrides,
                "resume": any(k == "resume" and truthy(v) for k, v in override_items(overrides).items()),
                "sweeper": _target_name(config.hydra.get("sweeper")),
                "launcher": _target_name(config.hydra.get("launcher")),
                "started_at": _now(),
                "finished_at": None,
            })
            index.setdefault("history", []).append({"started_at": index["started_at"], "overrides": overrides})
            for job in index.get("jobs", []):
                job["last_run"], job["kept"] = False, False
            index.setdefault("jobs", [])
            write_json_atomic(sweep_dir / INDEX, index)
        _ACTIVE.clear()
        _ACTIVE.update({"sweep_dir": sweep_dir, "planned": _planned_jobs(config, overrides),
                        "max_rows": self.max_rows, "print_summary": self.print_summary})
        if index["resume"] and not job_folders(sweep_dir):
            log.warning("+resume=true: no jobs in %s yet, so nothing to keep; to resume a sweep pass its "
                        "folder: hydra.sweep.dir=outputs/multirun/<date>/<time>", sweep_dir)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        try:
            folder = Path(str(config.hydra.runtime.output_dir)).resolve()
            sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
            entry = job_entry(folder, sweep_dir)
            entry["num"] = int(config.hydra.job.num)
            entry["last_run"] = True
            entry["kept"] = str(folder) in _KEPT
            if entry["status"] in ("no record", "running") and _job_failed(job_return):
                # The job died outside dilexp's own handling: say what Hydra saw.
                entry["status"] = "failed"
                entry["error"] = repr(getattr(job_return, "_return_value", None))[:500]
            with _locked(sweep_dir):
                index = load_index(sweep_dir)
                _upsert(index, entry)
                index["counts"] = status_counts([j for j in index["jobs"] if j.get("last_run")])
                write_json_atomic(sweep_dir / INDEX, index)
        except Exception as e:  # noqa: BLE001 - bookkeeping must never fail a job
            log.warning("sweep index: could not record the job (%s: %s)", type(e).__name__, e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        try:
            index = rebuild_index(sweep_dir, finished=True)
        except Exception as e:  # noqa: BLE001
            log.warning("sweep index: could not rebuild %s (%s: %s)", sweep_dir / INDEX, type(e).__name__, e)
            return
        if self.print_summary:
            print_sweep_summary(index, sweep_dir, max_rows=self.max_rows)


def _planned_jobs(config: DictConfig, overrides: list[str]) -> list[list[str]] | None:
    """Every job's overrides of a grid sweep (Hydra's basic sweeper), None for other sweepers."""
    if _target_name(config.hydra.get("sweeper")) != "BasicSweeper":
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 - an unusual sweep: the index just lists no planned jobs
        return None


def runs_here(sweep_dir: Path | None) -> bool:
    """Whether this process runs the sweep's loop (the basic launcher), not only one of its jobs."""
    active = _ACTIVE.get("sweep_dir")
    return active is not None and sweep_dir is not None and Path(sweep_dir).resolve() == active


def note_job_start(run_dir: Path) -> None:
    """The job this process runs now (an interrupted sweep names it)."""
    _ACTIVE["job"] = Path(run_dir).resolve()


def finish_interrupted_sweep(stop: Any) -> None:
    """After a stop signal: sweep.json records the jobs done so far, the stopped one and those not run.

    Hydra ends neither the job (no on_job_end) nor the sweep (no on_multirun_end) when a job
    raises past ``Exception``: this does their part. A no-op outside a sweep.
    """
    from dilexp import signals

    sweep_dir = _ACTIVE.get("sweep_dir")
    if sweep_dir is None:
        return
    try:
        with _locked(sweep_dir):
            index = load_index(sweep_dir)
            job = _ACTIVE.get("job")
            if job is not None and (job / SUMMARY).is_file():
                entry = job_entry(job, sweep_dir)
                entry["last_run"], entry["kept"] = True, False
                _upsert(index, entry)
            write_json_atomic(sweep_dir / INDEX, index)
        index = rebuild_index(sweep_dir, finished=True)
        ran = [j for j in index["jobs"] if j.get("last_run")]
        planned = _ACTIVE.get("planned")
        # launcher=slurm has submitted every job: they run on without this command.
        go_on = index.get("launcher") == "SlurmLauncher"
        not_run = None if planned is None or go_on else [
            p for p in planned if not any(same_job(j.get("overrides") or [], p, None) for j in ran)]
        index["interrupted"] = {"signal": signals.signal_name(stop.signum), "at": _now(),
                                "job": os.path.relpath(job, sweep_dir) if job is not None else None}
        if go_on:
            index["interrupted"]["jobs_go_on"] = True
        index["not_run"] = not_run
        with _locked(sweep_dir):
            write_json_atomic(sweep_dir / INDEX, index)
    except Exception as e:  # noqa: BLE001 - the exit code still says the sweep stopped
        log.warning("sweep index: could not record the interruption (%s: %s)", type(e).__name__, e)
        return
    if _ACTIVE.get("print_summary", True):
        print_sweep_summary(index, sweep_dir, max_rows=int(_ACTIVE.get("max_rows", 24)))


def _command_line() -> str:
    argv = list(sys.argv)
    # `python -m dilexp` shows up as the path of dilexp/__main__.py.
    if argv and argv[0].endswith(os.path.join("dilexp", "__main__.py")):
        argv = ["python", "-m", "dilexp", *argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def _job_failed(job_return: Any) -> bool:
    from hydra.core.utils import JobStatus

    return getattr(job_return, "status", None) == JobStatus.FAILED


def _target_name(node: Any) -> str | None:
    target = node.get("_target_") if node is not None else None
    return str(target).rsplit(".", 1)[-1] if target else None
