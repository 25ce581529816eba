"""Checkpoints a training run can be resumed from, and what resuming it takes.

- :class:`Checkpointing` (a Lightning callback) writes ``<run>/checkpoints/last.ckpt`` every
  ``task.checkpoint_every_n_steps`` steps, every ``task.checkpoint_every_s`` seconds, at the
  end, and when a stop signal arrives (dilexp/signals.py); always as a temporary file renamed
  over the old one, so a kill mid-write leaves the previous checkpoint whole and a re-run never
  makes ``last-v1.ckpt``. The checkpoint also carries the RNG states, restored when training
  starts again, so dropout continues where it stopped.
- :func:`resume_checkpoint`: ``task.resume=auto`` (the run folder's ``last.ckpt``, nothing if
  absent) or a path, checked before any work.
- :class:`StartAt`: the training data continues with the first sequence the stopped run had
  not seen (Lightning restarts a plain DataLoader's epoch from its beginning).
- W&B: a resumed run continues the W&B run of the stopped one (same id); the stopped attempt's
  offline folder is renamed ``superseded-offline-run-*`` so ``wandb sync .../offline-run-*``
  uploads each run once.
"""

from __future__ import annotations

import csv
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Sampler

from dilexp import signals
from dilexp.errors import ConfigError

LAST = "last.ckpt"
RNG_KEY = "dilexp_rng"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def resume_checkpoint(value: Any, run_dir: Path) -> Path | None:
    """The checkpoint ``task.resume`` asks for: None (start afresh), ``auto`` or a .ckpt / run folder."""
    if value is None or str(value).strip().lower() in ("", "null", "none", "false"):
        return None
    text = str(value).strip()
    if text.lower() in ("auto", "true"):
        last = checkpoint_dir(run_dir) / LAST
        return last if last.is_file() else None
    path = Path(text).expanduser()
    if path.is_dir():
        path = checkpoint_dir(path) / LAST
    if not path.is_file():
        raise ConfigError("task.resume", text, "no such checkpoint (give 'auto', a .ckpt file or a run folder "
                          "holding checkpoints/last.ckpt)")
    return path


def checkpoint_step(path: Path) -> int | None:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch says, the file cannot be used
        raise ConfigError("task.resume", str(path), f"cannot read the checkpoint ({type(e).__name__})") from None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else None


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- RNG -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # Plain types only: checkpoints are read with weights_only=True.
        "numpy": [str(np_state[0]), torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the callback ----------------------------------------------------------------------------


class Checkpointing(L.Callback):
    """last.ckpt on a step or time schedule, at the end and on a stop signal; stops the loop on one.

    ``enabled=False`` (task.checkpoint=false, fast_dev_run) writes nothing but still turns a
    signal into a clean stop at a step end.
    """

    def __init__(self, dirpath: Path, every_n_steps: int = 0, every_s: float = 0.0, enabled: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = max(0, int(every_n_steps or 0))
        self.every_s = max(0.0, float(every_s or 0.0))
        self.enabled = enabled
        self.saved_step: int | None = None
        self._rng: dict[str, Any] | None = None
        self._t_last = time.monotonic()
        # (stop, save) to do once the validation that follows this step has run.
        self._after_validation: tuple[bool, bool] | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        checkpoint[RNG_KEY] = rng_state()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        # Applied when training starts: creating the data iterators in between draws from the RNG.
        self._rng = checkpoint.get(RNG_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        self._t_last = time.monotonic()
        signals.note_step(trainer.global_step)
        signals.graceful(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        signals.note_step(step)
        stop = signals.received() is not None
        timed = self.every_s > 0 and time.monotonic() - self._t_last >= self.every_s
        if trainer.world_size > 1:
            # Every rank must stop (and save) at the same step: rank 0's clock and any rank's signal.
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            timed = bool(trainer.strategy.broadcast(timed, src=0))
        due = self.every_n_steps > 0 and step % self.every_n_steps == 0
        if not (stop or timed or due):
            return
        if _validates_after(trainer, batch_idx):
            # Saved once this step's validation has run: a checkpoint taken before it makes the
            # resumed run skip that validation (Lightning fast-forwards past it).
            self._after_validation = (stop, timed or due)
            return
        self._act(trainer, stop, timed or due)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation is None or trainer.sanity_checking:
            return
        stop, save = self._after_validation
        self._after_validation = None
        self._act(trainer, stop or signals.received() is not None, save)

    def _act(self, trainer: L.Trainer, stop: bool, save: bool) -> None:
        if self.enabled and (stop or save):
            self.save(trainer)
        if stop:
            raise signals.Interrupted(signals.received() or int(signals.STOP_SIGNALS[0]), trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signals.abrupt()
        if self.enabled and self.saved_step != trainer.global_step:
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        signals.abrupt()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        signals.abrupt()

    def save(self, trainer: L.Trainer) -> bool:
        """Write last.ckpt in place: a temporary file, then one rename. False (and one line) if it failed."""
        tmp = self.dirpath / (LAST + ".tmp")
        try:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                os.replace(tmp, self.last_path)
        except OSError as e:
            # A full disk must not end the run: the previous last.ckpt stays whole.
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
                _say(f"dilexp: could not write {self.last_path} at step {trainer.global_step} "
                     f"({e.strerror or e}); the previous checkpoint stays")
            return False
        self.saved_step = trainer.global_step
        self._t_last = time.monotonic()
        return True


def _validates_after(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the fit loop runs a validation right after this training batch (Lightning's rule)."""
    if not trainer.enable_validation or trainer.limit_val_batches == 0:
        return False
    every = trainer.val_check_batch
    if not isinstance(every, int) or every <= 0:
        return False
    return (batch_idx + 1) % every == 0 and trainer.global_step < (trainer.max_steps if trainer.max_steps > 0
                                                                   else float("inf"))


# -- data ------------------------------------------------------------------------------------


class StartAt(Sampler[int]):
    """Indices ``start .. n-1`` for the first pass, ``0 .. n-1`` after: the resumed epoch's rest."""

    def __init__(self, n: int, start: int) -> None:
        self.n, self.start = int(n), int(start)

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(range(start, self.n))

    def __len__(self) -> int:
        return self.n - self.start


def consumed_samples(global_step: int, batch_size: int, ranks: int, dataset_len: int) -> int:
    """Where in the epoch the next training batch starts (one optimizer step per batch, drop_last)."""
    per_step = batch_size * max(1, ranks)
    per_epoch = dataset_len // per_step
    if global_step <= 0 or per_epoch <= 0:
        return 0
    return (global_step % per_epoch) * per_step


# -- what a resumed run continues --------------------------------------------------------------


def _after(row: dict[str, str], step: int) -> bool:
    """Whether a metrics.csv row was logged after the checkpoint at ``step`` completed steps.

    Lightning logs a step's own values (train/loss, train/lr, the validation after it) under
    the count of steps done *before* it, so its row ``step`` is step+1's; dilexp's telemetry
    row ``step`` is the step just done.
    """
    value = row.get("step") or ""
    if not value.isdigit():
        return False
    if int(value) != step:
        return int(value) > step
    return any(v not in ("", None) for k, v in row.items()
               if k in ("train/loss", "train/lr") or (k or "").startswith("val/"))


def trim_metrics_csv(run_dir: Path, step: int) -> list[str] | None:
    """Drop metrics.csv rows logged after the checkpoint's step (the resumed run logs them again).

    Returns the file's columns (None: no file).
    """
    path = Path(run_dir) / "metrics.csv"
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields, rows = reader.fieldnames, list(reader)
    except OSError:
        return None
    if not fields or "step" not in fields:
        return None
    kept = [r for r in rows if not _after(r, step)]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)
    return list(fields)


def continue_metrics_csv(csv_logger: Any, run_dir: Path, step: int) -> None:
    """Keep the stopped run's metrics.csv rows up to ``step`` under a resumed run's CSVLogger.

    Lightning's CSV writer deletes an existing metrics.csv when it starts: the rows are set
    aside first and put back, with the writer told their columns so it appends to them.
    """
    path = Path(run_dir) / "metrics.csv"
    fields = trim_metrics_csv(run_dir, step)
    if fields is None:
        return
    saved = path.read_bytes()
    writer = csv_logger.experiment  # created now: this is where the old file goes
    path.write_bytes(saved)
    writer.metrics_keys = sorted(set(writer.metrics_keys) | set(fields))
    if writer.metrics_keys != fields:
        # Columns in the writer's order, so appended rows line up with the header.
        trim_metrics_csv(run_dir, step)
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        with path.open("w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=writer.metrics_keys)
            out.writeheader()
            out.writerows(rows)


# wandb's run folders: [offline-]run-<YYYYmmdd_HHMMSS>-<id>
_RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(\w+)$")


def _wandb_runs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "wandb"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _RUN_FOLDER.match(p.name)]
    # By start time (the folder's timestamp), not by kind.
    return sorted(found, key=lambda p: _RUN_FOLDER.match(p.name).group(1))  # type: ignore[union-attr]


def previous_wandb_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run in a run folder (folder names end in ``-<id>``)."""
    runs = _wandb_runs(run_dir)
    return _RUN_FOLDER.match(runs[-1].name).group(2) if runs else None  # type: ignore[union-attr]


def supersede_offline_runs(run_dir: Path) -> list[Path]:
    """Rename the stopped attempt's offline runs so `wandb sync <run>/wandb/offline-run-*` skips them."""
    moved = []
    for p in _wandb_runs(run_dir):
        if p.name.startswith("offline-run-"):
            target = p.with_name("superseded-" + p.name)
            os.replace(p, target)
            moved.append(target)
    return moved
