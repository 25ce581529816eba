"""The buffer-pool interface (DESIGN section 5)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dilexp.errors import ConfigError

Shape = tuple[int, ...] | torch.Size | list[int]
DeviceLike = torch.device | str | int | None


class MemoryPool(ABC):
    name: str = "base"

    @abstractmethod
    def empty(self, shape: Shape, dtype: torch.dtype, device: DeviceLike) -> torch.Tensor:
        """An uninitialised contiguous buffer of ``shape``; may be a reused one."""

    @abstractmethod
    def release(self, t: torch.Tensor) -> None:
        """Give a buffer back; the caller must not use it afterwards.

        That includes autograd: a buffer that a graph saved for backward must not be
        released before backward has run.
        """

    @abstractmethod
    def stats(self) -> dict[str, float]:
        """Flat counters: requests, reuses, reuse_rate, pooled_bytes, peak_pooled_bytes, ..."""

    def clear(self) -> None:  # pragma: no cover - optional for pools that hold nothing
        return None

    @contextmanager
    def borrow(self, shape: Shape, dtype: torch.dtype, device: DeviceLike) -> Iterator[torch.Tensor]:
        """``with pool.borrow(shape, dtype, device) as buf:`` -- released on exit, even on error."""
        t = self.empty(shape, dtype, device)
        try:
            yield t
        finally:
            self.release(t)


class NoPool(MemoryPool):
    """Plain torch allocation (the caching allocator): the control."""

    name = "none"

    def __init__(self) -> None:
        self._requests = 0

    def empty(self, shape: Shape, dtype: torch.dtype, device: DeviceLike = None) -> torch.Tensor:
        self._requests += 1
        return torch.empty(shape, dtype=dtype, device=device)

    def release(self, t: torch.Tensor) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {
            "requests": float(self._requests),
            "reuses": 0.0,
            "allocations": float(self._requests),
            "reuse_rate": 0.0,
            "pooled_bytes": 0.0,
            "peak_pooled_bytes": 0.0,
            "evictions": 0.0,
            "cleanups": 0.0,
        }


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$")


def parse_bytes(field: str, value: Any) -> int | None:
    """A byte count from a config value: ``1073741824``, ``"1GiB"``, ``"512 MB"``, ``1e9``; None stays None.

    Config values may come through ``oc.env`` as strings, so strings of digits are accepted
    too. KB/MB/GB are decimal and KiB/MiB/GiB binary, as the SI/IEC prefixes say.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(field, value, "expected a byte count such as 1073741824 or '1GiB'")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        text = str(value).strip().lower()
        # An env var cannot hold YAML null, so these spell "no cap" there.
        if text in ("none", "null", "inf", "unlimited"):
            return None
        m = _SIZE_RE.match(text)
        if m is None or m.group(2) not in _UNITS:
            raise ConfigError(field, value, "expected a byte count such as 1073741824, '512MiB' or '2GB'")
        n = float(m.group(1)) * _UNITS[m.group(2)]
    if n < 0 or n != n:
        raise ConfigError(field, value, "must be >= 0")
    if n == float("inf"):
        return None
    return int(n)
