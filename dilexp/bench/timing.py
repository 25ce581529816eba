"""Timing with spread, interleaved across candidates, with OOM as a result (DESIGN section 8).

``run_interleaved`` warms every candidate up and then times them round by round
(A, B, A, B, ...), so a machine that slows down for a while slows all of them alike and
their ratios hold. A candidate that fails stops being called; the others go on.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means "not enough memory" on any device.

    torch raises OutOfMemoryError on CUDA, but a RuntimeError on CPU ("DefaultCPUAllocator:
    can't allocate memory") and in some CUDA paths (cuBLAS/cuDNN workspaces).
    """
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return "out of memory" in msg or "can't allocate memory" in msg
    return False


def free_memory(device: torch.device) -> None:
    """Give back what a failed or finished case held, before the next one is measured."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on a GPU (device time), perf_counter on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def spread(values: list[float], unit: str) -> dict[str, Any]:
    """Median, quartiles, min, max and the raw list (kept for bootstrap CIs later), per ``unit``."""
    if not values:
        return {}
    ordered = sorted(values)
    if len(ordered) >= 2:
        # "inclusive" keeps the quartiles inside [min, max] for the few repeats a bench has.
        p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        p25 = p75 = ordered[0]
    return {
        f"median_{unit}": statistics.median(ordered),
        f"p25_{unit}": p25,
        f"p75_{unit}": p75,
        f"min_{unit}": ordered[0],
        f"max_{unit}": ordered[-1],
        f"times_{unit}": list(values),
    }


@dataclass
class Candidate:
    """One thing to time in a case: a name, a call, and what became of it."""

    key: str
    fn: Callable[[], Any]
    times_s: list[float] = field(default_factory=list)
    status: str = "ok"  # ok | oom | error
    error: str | None = None

    @property
    def alive(self) -> bool:
        return self.status == "ok"

    def fail(self, exc: BaseException) -> None:
        self.status = "oom" if is_oom(exc) else "error"
        # Only the message is kept: the exception's traceback would pin the case's tensors.
        self.error = f"{type(exc).__name__}: {exc}"[:500]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.alive and self.times_s else float("nan")


def _guarded(c: Candidate, device: torch.device, timed: bool) -> None:
    try:
        if timed:
            c.times_s.append(time_call(c.fn, device))
        else:
            c.fn()
            synchronize(device)
    except Exception as e:  # noqa: BLE001 - a failing case is a row, never the end of the run
        c.fail(e)
    if not c.alive:
        # Outside the except block: until it ends, the traceback's frames pin the tensors.
        free_memory(device)


def run_interleaved(candidates: list[Candidate], warmup: int, repeats: int, device: torch.device) -> None:
    """``warmup`` untimed then ``repeats`` timed rounds; each round calls every live candidate once."""
    for timed, rounds in ((False, warmup), (True, repeats)):
        for _ in range(rounds):
            for c in candidates:
                if c.alive:
                    _guarded(c, device, timed)
