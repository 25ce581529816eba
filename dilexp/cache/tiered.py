"""`gpu`: a two-tier, process-wide pattern cache (the seeds' "V3").

- hot tier: patterns stored on the device they are served on (the compute device; the
  CPU when there is no GPU), LRU, bounded by ``hot_max_bytes``. A hot hit is a dict lookup.
- cold tier: patterns stored on the host, LRU, bounded by ``max_entries``/``max_bytes``.
  A cold hit copies the pattern to the device (h2d_copies/h2d_bytes).

A miss stores the new pattern in the cold tier. A cold entry is promoted to the hot tier
once it has been hit ``promote_after`` times there; promotion that overflows the hot tier
demotes the least recently used hot entries to the cold tier (which may in turn evict its
own LRU entries). The tiers are exclusive: an entry lives in exactly one of them, so
``bytes == hot_bytes + cold_bytes`` and nothing is counted twice.

Pregeneration: inside ``with cache.pregenerating():`` (on the calling thread only), calls
are not counted as hits or misses; a missing pattern is built straight into the hot tier
(counted in ``pregenerated`` and ``build_s``) and a cold one is promoted at once. The
intended use, when ``cache.pregenerate`` is set::

    with cache.pregenerating():
        attn.prepare(n, device)   # get_or_build for every pattern the module will use

so that the first training step is already all hot hits and hit_rate stays a measure
of the steady state. What does not fit in ``hot_max_bytes`` ends up in the cold tier.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dilexp.cache import base as B
from dilexp.cache import settings as S
from dilexp.cache.lru import Slot, host_copy

# (setting, environment variable, default, parser) of every setting, in ``SETTINGS`` order.
_SPECS = (
    ("hot_max_bytes", S.ENV_HOT_MAX_BYTES, S.DEFAULT_HOT_MAX_BYTES, S.byte_size),
    ("max_entries", S.ENV_MAX_ENTRIES, S.DEFAULT_MAX_ENTRIES, S.positive_int),
    ("max_bytes", S.ENV_MAX_BYTES, S.DEFAULT_MAX_BYTES, S.byte_size),
    ("promote_after", S.ENV_PROMOTE_AFTER, S.DEFAULT_PROMOTE_AFTER, S.positive_int),
    ("pregenerate", S.ENV_PREGENERATE, S.DEFAULT_PREGENERATE, S.boolean),
)


class _Cold:
    """A cold-tier entry; mutable because it counts its own hits towards promotion."""

    __slots__ = ("pattern", "nbytes", "needs_copy", "hits")

    def __init__(self, pattern: B.Pattern, nbytes: int, needs_copy: bool) -> None:
        self.pattern = pattern
        self.nbytes = nbytes
        self.needs_copy = needs_copy
        self.hits = 0


class TwoTierCache(B.PatternCache):
    """Hot tier on the compute device, cold tier on the host; see the module docstring."""

    name = "gpu"
    SETTINGS = ("hot_max_bytes", "max_entries", "max_bytes", "promote_after", "pregenerate")
    process_wide = True

    def __init__(self, **settings: Any) -> None:
        """``settings``: any of ``SETTINGS``; one left out takes its environment/built-in default."""
        self._lock = threading.Lock()
        self._hot: OrderedDict[Slot, tuple[B.Pattern, int]] = OrderedDict()
        self._cold: OrderedDict[Slot, _Cold] = OrderedDict()
        self._hot_bytes = 0
        self._cold_bytes = 0
        self._n = B.Counters()
        # Pregeneration is per thread (another thread's lookups keep counting); the
        # shared counter lets the common case skip the thread-local read.
        self._tls = threading.local()
        self._pregen_active = 0
        self.hot_max_bytes = S.DEFAULT_HOT_MAX_BYTES
        self.max_entries = S.DEFAULT_MAX_ENTRIES
        self.max_bytes = S.DEFAULT_MAX_BYTES
        self.promote_after = S.DEFAULT_PROMOTE_AFTER
        self.pregenerate = S.DEFAULT_PREGENERATE
        self.configure(**settings, _defaults=True)

    def configure(self, _defaults: bool = False, **settings: Any) -> None:
        """Change the settings of this (shared) instance, demoting/evicting down to the limits.

        Settings left out or None keep their current value (or, on construction, take the
        environment/built-in default).
        """
        unknown = sorted(set(settings) - set(self.SETTINGS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown settings {unknown} (known: {list(self.SETTINGS)})")
        # Parse everything before changing anything: a bad value leaves the cache as it was.
        parsed = {name: S.setting(name, settings.get(name), env, default, parse)
                  for name, env, default, parse in _SPECS if settings.get(name) is not None or _defaults}
        with self._lock:
            for name, value in parsed.items():
                setattr(self, name, value)
            self._make_room_locked(0)
            self._trim_cold_locked()

    # -- lookups ---------------------------------------------------------------------

    def get_or_build(self, key: Hashable, build_fn: B.BuildFn, device: torch.device | str | None) -> B.Pattern:
        device = B.as_device(device)
        slot = (key, device)
        pregen = self._pregen_active > 0 and getattr(self._tls, "depth", 0) > 0
        with self._lock:
            hot = self._hot.get(slot)
            if hot is not None:
                self._hot.move_to_end(slot)
                if not pregen:
                    self._n.hits += 1
                return hot[0]
            cold = self._cold.get(slot)
            if cold is not None:
                self._cold.move_to_end(slot)
                if not pregen:
                    self._n.hits += 1
                    cold.hits += 1
                promote = pregen or cold.hits >= self.promote_after
                pattern, nbytes, needs_copy = cold.pattern, cold.nbytes, cold.needs_copy
        if cold is None:
            return self._miss(slot, build_fn, device, pregen)
        if not (needs_copy or promote):
            return pattern  # cold hit on the host device: nothing to copy or record
        dt = 0.0
        if needs_copy:
            t0 = time.perf_counter()
            pattern = B.pattern_to(pattern, device)
            dt = time.perf_counter() - t0
        with self._lock:
            if needs_copy:
                self._n.h2d_copies += 1
                self._n.h2d_bytes += nbytes
                self._n.lookup_s += dt
            # The entry may have been promoted, evicted or cleared while we copied.
            if promote and self._cold.get(slot) is cold and nbytes <= self.hot_max_bytes:
                del self._cold[slot]
                self._cold_bytes -= nbytes
                self._make_room_locked(nbytes)
                self._hot[slot] = (pattern, nbytes)
                self._hot_bytes += nbytes
                self._n.promotions += 1
        return pattern

    def _miss(self, slot: Slot, build_fn: B.BuildFn, device: torch.device, pregen: bool) -> B.Pattern:
        built, served, dt = B.timed_build(build_fn, device)
        nbytes = B.pattern_nbytes(served)
        to_hot = pregen and nbytes <= self.hot_max_bytes
        # The host copy is made outside the lock (it may be a device-to-host transfer).
        stored, needs_copy = (served, False) if to_hot else host_copy(built, served, device)
        with self._lock:
            self._n.build_s += dt
            if pregen:
                self._n.pregenerated += 1
            else:
                self._n.misses += 1
            if slot in self._hot or slot in self._cold:
                return served  # another thread stored it first
            if to_hot:
                self._make_room_locked(nbytes)
                self._hot[slot] = (stored, nbytes)
                self._hot_bytes += nbytes
            else:
                self._store_cold_locked(slot, stored, nbytes, needs_copy)
        return served

    # -- tier maintenance (lock held) --------------------------------------------------

    def _make_room_locked(self, nbytes: int) -> None:
        """Demote LRU hot entries until ``nbytes`` more fit under ``hot_max_bytes``."""
        hot = self._hot
        while hot and self._hot_bytes + nbytes > self.hot_max_bytes:
            slot, (pattern, size) = hot.popitem(last=False)
            self._hot_bytes -= size
            self._n.demotions += 1
            # Under the lock: a device-to-host copy on GPU, a no-op on CPU. Demotions
            # only happen under hot-tier pressure, so this is off the steady-state path.
            stored, needs_copy = host_copy(pattern, pattern, slot[1])
            self._store_cold_locked(slot, stored, size, needs_copy)

    def _store_cold_locked(self, slot: Slot, pattern: B.Pattern, nbytes: int, needs_copy: bool) -> None:
        if nbytes > self.max_bytes:
            self._n.evictions += 1  # would flush the whole tier: served, not stored
            return
        self._cold[slot] = _Cold(pattern, nbytes, needs_copy)
        self._cold_bytes += nbytes
        self._trim_cold_locked()

    def _trim_cold_locked(self) -> None:
        cold = self._cold
        while cold and (len(cold) > self.max_entries or self._cold_bytes > self.max_bytes):
            _, entry = cold.popitem(last=False)
            self._cold_bytes -= entry.nbytes
            self._n.evictions += 1

    # -- the rest of the interface -----------------------------------------------------

    @contextmanager
    def pregenerating(self) -> Iterator[None]:
        """Build into the hot tier without counting hits/misses (this thread only)."""
        depth = getattr(self._tls, "depth", 0)
        self._tls.depth = depth + 1
        with self._lock:
            self._pregen_active += 1
        try:
            yield
        finally:
            self._tls.depth = depth
            with self._lock:
                self._pregen_active -= 1

    def stats(self) -> dict[str, float]:
        with self._lock:
            return self._n.stats(
                entries=len(self._hot) + len(self._cold),
                bytes=self._hot_bytes + self._cold_bytes,
                hot_entries=len(self._hot),
                hot_bytes=self._hot_bytes,
                cold_entries=len(self._cold),
                cold_bytes=self._cold_bytes,
            )

    def keys(self) -> list[Hashable]:
        """Stored keys: the hot tier's, then the cold tier's, each least recently used first."""
        with self._lock:
            return [key for key, _ in self._hot] + [key for key, _ in self._cold]

    def tier_of(self, key: Hashable, device: torch.device | str | None) -> str | None:
        """Where the pattern for ``key`` on ``device`` lives now: "hot", "cold" or None."""
        slot = (key, B.as_device(device))
        with self._lock:
            if slot in self._hot:
                return "hot"
            return "cold" if slot in self._cold else None

    def clear(self) -> None:
        with self._lock:
            self._hot.clear()
            self._cold.clear()
            self._hot_bytes = 0
            self._cold_bytes = 0

