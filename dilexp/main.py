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
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from dilexp.errors import ConfigError
from dilexp.tasks.context import JobContext, resolved

log = logging.getLogger("dilexp")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


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
    raise ConfigError("task.name", name, "choose 'train' or 'bench'")


def _run(cfg: DictConfig, ctx: JobContext, prepared: Any, record: Any) -> dict[str, Any]:
    if cfg.task.name == "train":
        from dilexp.tasks.train import run_train

        return run_train(cfg, ctx, prepared, record)
    from dilexp.tasks.bench import run_bench

    return run_bench(cfg, ctx, prepared, record)


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    from dilexp.cache import reset_global_cache
    from dilexp.telemetry.record import RunRecord
    from dilexp.telemetry.wandb_logger import finish_wandb

    ctx = JobContext.from_hydra()
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

    record = RunRecord(ctx.run_dir, str(cfg.task.name), ctx.choices, ctx.overrides, resolved(cfg))
    try:
        result = _run(cfg, ctx, prepared, record)
    except (Exception, KeyboardInterrupt) as e:
        record.finish("failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20))
        finish_wandb()
        _say(f"dilexp: job failed ({type(e).__name__}: {e}); record in {ctx.run_dir}")
        if ctx.multirun and not isinstance(e, KeyboardInterrupt):
            return None
        raise
    record.finish("completed", **result)
    finish_wandb()
    _say(f"dilexp: run folder: {ctx.run_dir}")
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
