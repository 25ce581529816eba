"""The two simplest strategies: `none` (the control) and `local` (a dict per attention module)."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from dilexp.cache import base as B


class NoCache(B.PatternCache):
    """Builds on every call: what a pattern costs without any cache."""

    name = "none"

    def __init__(self) -> None:
        self._n = B.Counters()

    def get_or_build(self, key: Hashable, build_fn: B.BuildFn, device: torch.device | str | None) -> B.Pattern:
        _, pattern, dt = B.timed_build(build_fn, B.as_device(device))
        self._n.build_s += dt
        self._n.misses += 1
        return pattern

    def stats(self) -> dict[str, float]:
        return self._n.stats()

    def clear(self) -> None:
        return None


class LocalCache(B.PatternCache):
    """A plain dict keyed by (key, device): no lock, no eviction, no copies on a hit.

    One instance per attention module, so it is only touched by one thread. Hits are
    counted, not timed: reading the clock twice would cost more than the lookup itself.
    """

    name = "local"

    def __init__(self) -> None:
        self._store: dict[tuple[Hashable, torch.device], B.Pattern] = {}
        self._bytes = 0
        self._n = B.Counters()

    def get_or_build(self, key: Hashable, build_fn: B.BuildFn, device: torch.device | str | None) -> B.Pattern:
        device = B.as_device(device)
        slot = (key, device)
        pattern = self._store.get(slot)
        if pattern is not None:
            self._n.hits += 1
            return pattern
        _, pattern, dt = B.timed_build(build_fn, device)
        self._n.build_s += dt
        self._n.misses += 1
        self._store[slot] = pattern
        self._bytes += B.pattern_nbytes(pattern)
        return pattern

    def stats(self) -> dict[str, float]:
        # Everything is stored on the device it is served on: all of it is "hot".
        n = len(self._store)
        return self._n.stats(entries=n, bytes=self._bytes, hot_entries=n, hot_bytes=self._bytes)

    def keys(self) -> list[Hashable]:
        """Stored keys, one per stored (key, device) slot, in insertion order."""
        return [k for k, _ in self._store]

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0
