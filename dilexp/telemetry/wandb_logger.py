"""W&B through Lightning's WandbLogger, offline unless the user is logged in, never fatal."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from dilexp.telemetry.loggers import FAILED, guarded

log = logging.getLogger(__name__)


def wandb_mode(requested: str | None) -> str:
    """`auto` -> WANDB_MODE if set, online when an API key is known, else offline."""
    if requested and requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class SafeWandbLogger(WandbLogger):
    """A WandbLogger whose failures are warnings: W&B trouble never kills a run."""

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        out = guarded(f"W&B {what}", fn, *args, **kwargs)
        return None if out is FAILED else out

    def update_summary(self, metrics: dict[str, Any]) -> None:
        """Figures for the run's summary (the last value of each key, shown in W&B's run table)."""
        self._guard("summary", lambda: self.experiment.summary.update(metrics))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._guard("log_metrics", super().log_metrics, metrics, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._guard("log_hyperparams", super().log_hyperparams, params, *args, **kwargs)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_table", super().log_table, *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard("after_save_checkpoint", super().after_save_checkpoint, checkpoint_callback)

    def finalize(self, status: str) -> None:
        self._guard("finalize", super().finalize, status)


def make_wandb_logger(settings: Any, run_dir: Path, name: str, group: str | None, tags: list[str],
                      config: dict[str, Any], run_id: str | None = None) -> SafeWandbLogger | None:
    """``run_id``: continue that W&B run (a resumed training run) instead of starting a new one."""
    try:
        resume = {"id": run_id, "resume": "allow"} if run_id else {}
        mode = wandb_mode(settings.get("mode", "auto"))
        if mode == "disabled":
            return None
        logger = SafeWandbLogger(
            project=settings.get("project", "dilexp"),
            entity=settings.get("entity"),
            name=name,
            group=group,
            tags=tags,
            save_dir=str(run_dir),
            mode=mode,
            config=config,
            log_model=False,
            **resume,
            # W&B's own start and end blocks off (finish_wandb prints the one line that
            # matters: how to upload the run); WANDB_SILENT/WANDB_QUIET set by a user win.
            **({} if _user_set_verbosity() else {"settings": _silent_settings()}),
        )
        # Lightning passes anonymous=None, which W&B warns about as a deprecated setting.
        logger._wandb_init.pop("anonymous", None)
        _ = logger.experiment  # start it now, so a failure shows here and not mid-run
        return logger
    except Exception as e:  # noqa: BLE001
        log.warning("W&B could not start (%s: %s); the run goes on without it", type(e).__name__, e)
        return None


def _user_set_verbosity() -> bool:
    return any(os.environ.get(k) for k in ("WANDB_SILENT", "WANDB_QUIET"))


def _silent_settings() -> Any:
    import wandb

    return wandb.Settings(silent=True)


def finish_wandb() -> None:
    """End the current W&B run so the next job of a multirun gets its own; say where it went
    (offline: the `wandb sync` command that uploads it)."""
    try:
        import wandb

        run = wandb.run
        if run is None:
            return
        where = f"offline; upload it with: wandb sync {run.settings.sync_dir}" if run.offline else f"at {run.url}"
        silent = bool(run.settings.silent)
        wandb.finish()
        if silent and not _user_set_verbosity():
            print(f"dilexp: W&B run {where}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001
        log.warning("W&B finish failed (%s); ignored", e)
