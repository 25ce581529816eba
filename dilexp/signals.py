"""Stop signals: SIGTERM, SIGINT and SIGUSR1 end a job as ``interrupted``, never as a silent success.

SIGTERM is what ``timeout``, SLURM (``scancel``, preemption) and Kubernetes send; SIGINT is Ctrl-C;
SIGUSR1 is what clusters are often told to send ahead of a time limit. Each of them:

- outside training, raises :class:`Interrupted` at once (set-up, validation-only tasks, between
  the jobs of a sweep);
- while a training loop is running (:func:`graceful` is active), is only noted: the training
  callback (dilexp/resume.py) stops at the end of the current step, writes ``last.ckpt`` and
  raises :class:`Interrupted` there, so the checkpoint holds a whole step. A second signal
  while that is pending stops at once (the same one repeated within a second is one stop
  delivered twice: Ctrl-C reaches every process of the group, and parents forward it too).

The handlers stay installed for the whole process (:func:`install`, from ``main``), so a
signal that arrives between two jobs of a sweep is handled too. The process then exits with
``128 + signal``, the shell's convention for a death by signal.

Lightning installs its own SIGTERM handler during ``fit`` and calls the one it found (ours)
as well; it would then raise its ``SIGTERMException`` (a ``SystemExit`` with code 0) at a point
of its choosing. While training we clear its flag again, so the stop happens at our step end.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

# A repeat of the first signal within this many seconds is the same stop, not a second one.
DUPLICATE_S = 1.0
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(BaseException):
    """A job stopped by a signal. A BaseException, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum = int(signum)
        self.step = step
        super().__init__(f"interrupted by {signal_name(self.signum)}" + (f" at step {step}" if step is not None
                                                                         else ""))

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


@dataclass
class _State:
    signum: int | None = None
    # The trainer whose loop stops at a step end (None: stop at once).
    trainer: Any = None
    # The last completed training step, for the record of a stop outside the loop.
    step: int | None = None
    # When the first signal came (time.monotonic()).
    at: float = 0.0


_STATE = _State()
_INSTALLED: dict[int, Any] = {}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def received() -> int | None:
    """The first stop signal this process got, if any."""
    return _STATE.signum


def last_step() -> int | None:
    return _STATE.step


def note_step(step: int) -> None:
    _STATE.step = int(step)


def reset() -> None:
    """Forget a handled signal (tests; a sweep stops after one anyway)."""
    _STATE.signum, _STATE.trainer, _STATE.step, _STATE.at = None, None, None, 0.0


def graceful(trainer: Any) -> None:
    """From now on a stop signal is noted, and ``trainer``'s loop stops at the end of its step."""
    _STATE.trainer = trainer


def abrupt() -> None:
    """Back to stopping at once (the training loop has ended)."""
    _STATE.trainer = None


def _handler(signum: int, frame: FrameType | None) -> None:
    first = _STATE.signum is None
    if first:
        _STATE.signum, _STATE.at = int(signum), time.monotonic()
    elif int(signum) == _STATE.signum and time.monotonic() - _STATE.at < DUPLICATE_S:
        # The same signal twice at once is one stop delivered two ways (Ctrl-C reaches the whole
        # process group, and a parent forwards it too), not a user insisting.
        return
    trainer = _STATE.trainer
    if trainer is not None and first:
        # Lightning's own SIGTERM handler ran before us and set its flag: our step end decides.
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "received_sigterm"):
            connector.received_sigterm = False
        return
    raise Interrupted(_STATE.signum if first else int(signum), _STATE.step)


def install() -> None:
    """Route the stop signals to dilexp's handler (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        if int(sig) not in _INSTALLED:
            _INSTALLED[int(sig)] = signal.getsignal(sig)
        signal.signal(sig, _handler)


def uninstall() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, old in _INSTALLED.items():
        signal.signal(signum, old if old is not None else signal.SIG_DFL)
    _INSTALLED.clear()
