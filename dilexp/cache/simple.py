"""The two simplest strategies: `none` (the control) and `local` (a dict per attention module)."""

from __future__ import annotations

import time
from collections.abc import Hashable

import torch

from dilexp.cache.base import (
    BuildFn,
    Pattern,
    PatternCache,
    as_device,
    make_stats,
    pattern_nbytes,
    pattern_to,
)


class NoCache(PatternCache):
    """Builds on every call: what a pattern costs without any cache."""

    name = "none"

    def __init__(self) -> None:
        self._misses = 0
        self._build_s = 0.0

    def get_or_build(self, key: Hashable, build_fn: BuildFn, device: torch.device | str | None) -> Pattern:
        t0 = time.perf_counter()
        pattern = pattern_to(build_fn(), as_device(device))
        self._build_s += time.perf_counter() - t0
        self._misses += 1
        return pattern

    def stats(self) -> dict[str, float]:
        return make_stats(misses=self._misses, build_s=self._build_s)

    def clear(self) -> None:
        return None


class LocalCache(PatternCache):
    """A plain dict keyed by (key, device): no lock, no eviction, no copies on a hit.

    One instance per attention module, so it is only touched by one thread. Hits are
    counted, not timed: reading the clock twice would cost more than the lookup itself.
    """

    name = "local"

    def __init__(self) -> None:
        self._store: dict[tuple[Hashable, torch.device], Pattern] = {}
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._build_s = 0.0

    def get_or_build(self, key: Hashable, build_fn: BuildFn, device: torch.device | str | None) -> Pattern:
        device = as_device(device)
        slot = (key, device)
        pattern = self._store.get(slot)
        if pattern is not None:
            self._hits += 1
            return pattern
        t0 = time.perf_counter()
        pattern = pattern_to(build_fn(), device)
        self._build_s += time.perf_counter() - t0
        self._misses += 1
        self._store[slot] = pattern
        self._bytes += pattern_nbytes(pattern)
        return pattern

    def stats(self) -> dict[str, float]:
        # Everything is stored on the device it is served on: all of it is "hot".
        n = len(self._store)
        return make_stats(
            hits=self._hits,
            misses=self._misses,
            entries=n,
            bytes=self._bytes,
            hot_entries=n,
            hot_bytes=self._bytes,
            build_s=self._build_s,
        )

    def keys(self) -> list[Hashable]:
        """Stored keys, one per stored (key, device) slot, in insertion order."""
        return [k for k, _ in self._store]

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0
