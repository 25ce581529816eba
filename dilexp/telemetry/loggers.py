"""The run's loggers (CSV, W&B): one factory for every task, one guard for their failures.

Logging is never a reason for a run to fail: a logger call that raises becomes one warning
(``guarded``), and ``RunLoggers`` (task=bench, which logs outside Lightning) drops a logger
after its first failure.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# What ``guarded`` returns when the call raised (None can be a call's own result).
FAILED: Any = object()


def guarded(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or ``FAILED`` with one warning naming ``what`` when it raises."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a logger's trouble must never end the run
        log.warning("%s failed (%s: %s); the run goes on without it", what, type(e).__name__, e)
        return FAILED


class JobNames(Protocol):
    """What the factory needs of a job (``dilexp.tasks.context.JobContext``)."""

    run_dir: Path

    def run_name(self) -> str: ...

    def group(self, cfg: DictConfig) -> str | None: ...

    def tags(self) -> list[str]: ...


def make_loggers(cfg: DictConfig, ctx: JobNames, record: Any, resume_step: int | None = None) -> list[Any]:
    """The configured Lightning loggers (``logger=csv``, ``wandb``) of a job writing into its run folder.

    A logger that cannot start is left out with a warning; a started W&B run is noted in the
    run record (its folder, group, mode and id). ``resume_step``: a training run resumed from
    that step's checkpoint keeps its metrics.csv rows up to there and continues its W&B run
    (dilexp/resume.py).
    """
    from dilexp.telemetry.wandb_logger import make_wandb_logger, wandb_mode

    run_dir = Path(ctx.run_dir)
    node = cfg.get("logger") or {}
    loggers: list[Any] = []
    if "csv" in node:
        from lightning.pytorch.loggers import CSVLogger

        flush = int((node.get("csv") or {}).get("flush_every", 10))
        # version="" puts metrics.csv straight into the run folder.
        csv_logger = guarded("CSV logger start", CSVLogger, save_dir=str(run_dir), name="", version="",
                             flush_logs_every_n_steps=flush)
        if csv_logger is not FAILED:
            if resume_step is not None:
                from dilexp.resume import continue_metrics_csv

                continue_metrics_csv(csv_logger, run_dir, resume_step)
            loggers.append(csv_logger)
    if "wandb" in node:
        run_id = None
        if resume_step is not None:
            from dilexp.resume import previous_wandb_id, supersede_offline_runs

            run_id = previous_wandb_id(run_dir)
            supersede_offline_runs(run_dir)
        wb = make_wandb_logger(node.wandb, run_dir, ctx.run_name(), ctx.group(cfg), ctx.tags(),
                               OmegaConf.to_container(cfg, resolve=True), run_id=run_id)  # type: ignore[arg-type]
        if wb is not None:
            loggers.append(wb)
            record.update(wandb={"dir": Path(wb.save_dir or run_dir).name, "group": ctx.group(cfg),
                                 "mode": wandb_mode(node.wandb.get("mode")), "id": wb.experiment.id,
                                 "resumed": run_id is not None})
    return loggers


class RunLoggers:
    """A task's CSV (metrics.csv) and W&B loggers driven by hand (task=bench, outside Lightning's
    Trainer); a logger whose call fails is dropped with a warning."""

    def __init__(self, csv_logger: Any | None, wandb_logger: Any | None) -> None:
        self.csv = csv_logger
        self.wandb = wandb_logger

    @classmethod
    def of(cls, loggers: list[Any]) -> RunLoggers:
        from lightning.pytorch.loggers import CSVLogger

        csv_logger = next((lg for lg in loggers if isinstance(lg, CSVLogger)), None)
        return cls(csv_logger, next((lg for lg in loggers if lg is not csv_logger), None))

    def _call(self, name: str, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        label = "W&B" if name == "wandb" else "CSV logger"
        if guarded(f"{label} {what}", fn, *args, **kwargs) is FAILED:
            setattr(self, name, None)

    def _each(self) -> list[tuple[str, Any]]:
        return [(n, lg) for n, lg in (("csv", self.csv), ("wandb", self.wandb)) if lg is not None]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        def write(lg: Any, is_csv: bool) -> None:
            with warnings.catch_warnings():
                # Lightning warns that the run folder is not empty (it holds .hydra/ and
                # bench.csv); it only ever rewrites its own metrics.csv there.
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                lg.log_metrics(metrics, step=step)
                if is_csv:
                    lg.save()  # the file is complete after every case, even if the run dies later

        for name, lg in self._each():
            self._call(name, "log_metrics", write, lg, name == "csv")

    def log_wandb_table(self, key: str, columns: list[str], data: list[list[Any]]) -> None:
        if self.wandb is not None and data:
            self._call("wandb", "log_table", self.wandb.log_table, key=key, columns=columns, data=data)

    def update_summary(self, metrics: dict[str, Any]) -> None:
        if self.wandb is not None:
            self._call("wandb", "summary", lambda: self.wandb.experiment.summary.update(metrics))

    def finish(self) -> None:
        for name, lg in self._each():
            self._call(name, "finalize", lg.finalize, "success")
