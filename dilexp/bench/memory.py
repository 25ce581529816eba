"""The peak memory of one case, measured in a separate untimed call.

Timed rounds interleave several candidates, so any peak taken over them mixes the
candidates; one extra call per candidate, alone, gives each its own figure:

- CUDA: torch's allocator peak during the call minus what was allocated before it
  (``peak_alloc_source = "cuda_allocator"``).
- CPU: the process RSS high-water mark cannot be reset, so the call runs under torch's
  profiler with memory events on; every allocation and free of torch's CPU allocator
  during the call (kernel scratch buffers included) is replayed and the running
  maximum is the peak (``peak_alloc_source = "cpu_profiler"``). Buffers allocated
  before the call and freed during it are not seen, so this is the peak of what the
  call itself allocated, not of the process.

The process figures of ``dilexp.telemetry.memory`` (``rss_delta_mb``,
``peak_rss_since_reset_mb``, reset at the start of the call) come with it, under those names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dilexp.telemetry.memory import memory_snapshot, reset_peak

log = logging.getLogger(__name__)
_MB = float(2**20)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Kineto prints two USDT lines per profiler start/stop straight to fd 2 (not through
    Python), one pair per case; this hides them while the profiler starts and stops."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_profiled_peak(fn: Callable[[], Any]) -> float | None:
    """Peak bytes live from allocations made during ``fn``, from the profiler's memory events.

    None when the profiler cannot tell (``fn`` has still run once); errors of ``fn`` propagate.
    """
    from torch.autograd.profiler import profile

    try:
        prof = profile(profile_memory=True)
        with _stderr_silenced():
            prof.__enter__()
    except Exception as e:  # noqa: BLE001 - no profiler means no figure, not a failed case
        log.warning("CPU allocation tracking unavailable (%s); peak_alloc_mb left empty", e)
        fn()
        return None
    try:
        fn()
    finally:
        with _stderr_silenced():
            prof.__exit__(None, None, None)
    try:
        # kineto_results is not public API: read it defensively.
        events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += int(e.nbytes())  # negative for frees
            peak = max(peak, live)
    except Exception as e:  # noqa: BLE001
        log.warning("CPU allocation events unreadable (%s); peak_alloc_mb left empty", e)
        return None
    return float(peak)


def measure_case_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run ``fn`` once, alone, and return its peak allocation and the process memory figures.

    Raises what ``fn`` raises (an OOM here is the caller's to record).
    """
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        reset_peak(device)
        fn()
        torch.cuda.synchronize(device)
        out["peak_alloc_mb"] = (torch.cuda.max_memory_allocated(device) - before) / _MB
        out["peak_alloc_source"] = "cuda_allocator"
        snap = memory_snapshot(device)
        out["peak_reserved_mb"] = snap.get("peak_reserved_mb", float("nan"))
    else:
        reset_peak(device)
        peak = _cpu_profiled_peak(fn)
        out["peak_alloc_mb"] = float("nan") if peak is None else peak / _MB
        out["peak_alloc_source"] = "none" if peak is None else "cpu_profiler"
        snap = memory_snapshot(device)
    out["rss_delta_mb"] = snap.get("rss_delta_mb", float("nan"))
    out["peak_rss_since_reset_mb"] = snap.get("peak_rss_since_reset_mb", float("nan"))
    return out
