"""The allocator's and the process's own memory figures, flat and ready to log.

``memory_snapshot(device)`` returns keys without a prefix (the caller adds ``memory/``):

Always (the host process):
- ``rss_mb``: current resident set size, from /proc/self/statm (psutil where there is no
  /proc); left out when neither can be read.
- ``peak_rss_mb``: the process high-water mark (getrusage ru_maxrss, or the current RSS
  where the kernel's lazily updated mark trails it). The kernel never resets it, so it
  covers everything since the process started, earlier jobs of an in-process Hydra
  multirun included.
- ``rss_delta_mb``: ``rss_mb`` now minus ``rss_mb`` at the last ``reset_peak``.
- ``peak_rss_since_reset_mb``: the peak since the last ``reset_peak`` where that can be
  known: exact when the process set a new high-water mark after the reset (the kernel's
  figure is then that peak); otherwise the best lower bound, the larger of the RSS at the
  reset and now. Without a reset it equals ``peak_rss_mb``.

On CUDA devices, from torch.cuda.memory_stats (the caching allocator), in addition:
- ``allocated_mb``, ``peak_allocated_mb``, ``reserved_mb``, ``peak_reserved_mb``;
  the peaks since the last ``reset_peak``.
- ``fragmentation_mb``: reserved minus allocated, now: memory torch holds but no tensor uses.
- ``num_alloc_retries``, ``num_ooms``: cumulative since the process started (``reset_peak``
  leaves them, as torch's reset_peak_memory_stats does).
"""

from __future__ import annotations

import os
import sys
import threading

import torch

_MB = float(2**20)
_lock = threading.Lock()
# Process figures at the last reset_peak: (rss bytes, ru_maxrss bytes); None before any.
_baseline: tuple[int, int] | None = None


def _maxrss_bytes() -> int:
    try:
        import resource  # POSIX only
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # optional, for systems without /proc

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - any failure means "unknown", never a crash in telemetry
        return None


def _as_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def memory_snapshot(device: torch.device | str | int | None = None) -> dict[str, float]:
    """Memory figures for ``device`` (and the host process) as flat floats; see the module doc."""
    out: dict[str, float] = {}
    rss = _rss_bytes()
    # The kernel updates its high-water mark lazily, so it can trail the current RSS.
    peak = max(_maxrss_bytes(), rss or 0)
    with _lock:
        baseline = _baseline
    out["peak_rss_mb"] = peak / _MB
    if rss is not None:
        out["rss_mb"] = rss / _MB
    if baseline is None:
        out["peak_rss_since_reset_mb"] = peak / _MB
    else:
        rss0, peak0 = baseline
        if rss is not None:
            out["rss_delta_mb"] = (rss - rss0) / _MB
        since = peak if peak > peak0 else max(rss0, rss or 0)
        out["peak_rss_since_reset_mb"] = since / _MB

    dev = _as_device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        st = torch.cuda.memory_stats(dev)
        allocated = st.get("allocated_bytes.all.current", 0)
        reserved = st.get("reserved_bytes.all.current", 0)
        out.update({
            "allocated_mb": allocated / _MB,
            "peak_allocated_mb": st.get("allocated_bytes.all.peak", 0) / _MB,
            "reserved_mb": reserved / _MB,
            "peak_reserved_mb": st.get("reserved_bytes.all.peak", 0) / _MB,
            "fragmentation_mb": (reserved - allocated) / _MB,
            "num_alloc_retries": float(st.get("num_alloc_retries", 0)),
            "num_ooms": float(st.get("num_ooms", 0)),
        })
    return out


def reset_peak(device: torch.device | str | int | None = None) -> None:
    """Start a new peak window: torch's peak counters on CUDA, a recorded baseline for the process.

    The process high-water mark itself cannot be reset (the kernel keeps ru_maxrss for the
    process's life), so on CPU this records the current RSS and high-water mark, against
    which ``rss_delta_mb`` and ``peak_rss_since_reset_mb`` are reported.
    """
    global _baseline
    rss = _rss_bytes()
    peak = max(_maxrss_bytes(), rss or 0)
    with _lock:
        _baseline = (rss if rss is not None else 0, peak)
    dev = _as_device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(dev)
