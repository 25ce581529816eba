"""`python -m dilexp` / `dilexp`: the Hydra entry point.

One job = validate (every object built from the config, before any work) -> run the task
-> write the run record. A bad setting is one line naming the field and exit code 2;
in a multirun a failing job is recorded as failed and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import traceback
from typing import Any

import hydra
from omegaconf import DictConfig

import dilexp.sweep  # noqa: F401  (registers the resolvers the Hydra config uses, also for --cfg)
from dilexp.errors import ConfigError
from dilexp.paths import CONF_DIR
from dilexp.tasks.context import JobContext, resolved

log = logging.getLogger("dilexp")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prepare(cfg: DictConfig) -> Any:
    name = str(cfg.task.name)
    if name == "train":
        from dilexp.tasks.train import Prepared

        return Prepared(cfg)
    if name == "bench":
        from dilexp.tasks.bench import PreparedBench

        return PreparedBench(cfg)
    if name == "eval":
        from dilexp.tasks.eval import PreparedEval

        return PreparedEval(cfg)
    if name == "check":
        from dilexp.tasks.check import PreparedCheck

        return PreparedCheck(cfg)
    raise ConfigError("task.name", name, "choose 'train', 'bench', 'eval' or 'check'")


def _run(cfg: DictConfig, ctx: JobContext, prepared: Any, record: Any) -> dict[str, Any]:
    if cfg.task.name == "train":
        from dilexp.tasks.train import run_train

        return run_train(cfg, ctx, prepared, record)
    if cfg.task.name == "eval":
        from dilexp.tasks.eval import run_eval

        return run_eval(cfg, ctx, prepared, record)
    if cfg.task.name == "check":
        from dilexp.tasks.check import run_check

        return run_check(cfg, ctx, prepared, record)
    from dilexp.tasks.bench import run_bench

    return run_bench(cfg, ctx, prepared, record)


def is_launched_rank() -> bool:
    """True in the extra ranks Lightning's DDP launcher starts (they re-run this entry point)."""
    return int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0


def is_multiprocess(cfg: DictConfig) -> bool:
    hw = cfg.hardware
    devices = hw.get("devices", 1)
    many = isinstance(devices, (list, tuple)) or str(devices) in ("-1", "auto") or int(str(devices)) > 1
    return many or int(hw.get("num_nodes", 1)) > 1


def _run_as_own_launch(ctx: JobContext) -> dict[str, Any] | None:
    """A multi-process job inside a multirun runs as a single run in a child process.

    Lightning's DDP launcher re-runs the command line in each extra rank; inside a
    sweep that command line is the whole sweep. As its own `python -m dilexp` the job's
    ranks re-run just the job, in the job's folder.
    """
    import subprocess

    from dilexp.telemetry.record import read_summary

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "dilexp", *ctx.overrides, f"hydra.run.dir={ctx.run_dir}"]
    proc = subprocess.run(cmd, env=env)
    summary = read_summary(ctx.run_dir) or {}
    if proc.returncode != 0:
        _say(f"dilexp: job {ctx.job_num} exited with {proc.returncode}; record in {ctx.run_dir}")
    return summary if summary.get("status") == "completed" else None


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    from dilexp.cache import reset_global_cache
    from dilexp.telemetry.record import NoRecord, RunRecord
    from dilexp.telemetry.wandb_logger import finish_wandb

    ctx = JobContext.from_hydra()
    if ctx.multirun and cfg.get("resume"):
        from dilexp.sweep import kept_result

        # +resume=true: a job completed earlier with the same overrides is not run again.
        kept = kept_result(ctx.run_dir, ctx.sweep_dir, ctx.overrides)
        if kept is not None:
            _say(f"dilexp: kept (completed earlier): {ctx.run_dir}")
            return kept
    if ctx.multirun and is_multiprocess(cfg):
        return _run_as_own_launch(ctx)
    child_rank = is_launched_rank()
    # Jobs of a multirun share this process: process-wide caches must not carry counts over.
    reset_global_cache()
    ctx.choices.setdefault("logger", ",".join(sorted(cfg.get("logger") or {})) or "none")
    try:
        prepared = _prepare(cfg)
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        _say(f"dilexp: config error: {e}")
        if ctx.multirun:
            RunRecord(ctx.run_dir, str(cfg.task.name), ctx.choices, ctx.overrides, resolved(cfg)).finish(
                "failed", error=f"ConfigError: {e}")
            return None
        # Nothing ran: leave no half-made run folder behind.
        shutil.rmtree(ctx.run_dir, ignore_errors=True)
        sys.exit(2)
    except Exception as e:
        # Building can fail in ways no check foresees (an OOM while allocating the model):
        # in a sweep that is this job's result, and the other jobs still run.
        if not ctx.multirun or child_rank:
            raise
        RunRecord(ctx.run_dir, str(cfg.task.name), ctx.choices, ctx.overrides, resolved(cfg)).finish(
            "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20))
        _say(f"dilexp: job failed while building ({type(e).__name__}: {e}); record in {ctx.run_dir}")
        return None

    # Only the launching rank keeps the record; the extra ranks share its folder.
    record = NoRecord() if child_rank else RunRecord(ctx.run_dir, str(cfg.task.name), ctx.choices, ctx.overrides,
                                                     resolved(cfg))
    try:
        result = _run(cfg, ctx, prepared, record)
    except (Exception, KeyboardInterrupt) as e:
        record.finish("failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20))
        finish_wandb()
        _say(f"dilexp: job failed ({type(e).__name__}: {e}); record in {ctx.run_dir}")
        if ctx.multirun and not isinstance(e, KeyboardInterrupt):
            return None
        raise
    # task=check: a failed certificate is a completed job with a verdict (check/passed = 0 in
    # its record, so a sweep goes on and compare reads it), and a non-zero exit for a single run.
    exit_code = int(result.pop("exit_code", 0))
    record.finish("completed", **result)
    finish_wandb()
    if not child_rank:
        _say(f"dilexp: run folder: {ctx.run_dir}")
    if exit_code and not ctx.multirun:
        sys.exit(exit_code)
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from dilexp.console import quiet_console
    from dilexp.sweep import objective

    quiet_console()
    # A sweeper that optimises (hparams_search=...) reads `optimized_metric` from the return value.
    return objective(cfg, run_job(cfg))


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
