"""`cpu`: one process-wide, thread-safe LRU of host-resident patterns (the seeds' "V2").

Patterns are stored on the host and copied to the requested device on every hit; on a
CPU device the stored object itself is returned. Device stays part of the lookup: a
pattern requested for ``cuda:0`` and for ``cpu`` are two entries, because ``build_fn``
may build device-specific patterns and every strategy must count hits the same way.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch

from dilexp.cache import settings as S
from dilexp.cache.base import CPU, BuildFn, Counters, Pattern, PatternCache, as_device, pattern_nbytes, pattern_to
from dilexp.cache.base import timed_build as _timed_build

Slot = tuple[Hashable, torch.device]


def host_copy(built: Pattern, served: Pattern, device: torch.device) -> tuple[Pattern, bool]:
    """The host form of a freshly built pattern, and whether hits must copy it to ``device``.

    ``built`` is preferred over ``served`` so a pattern built on the host is not sent to
    the device and back. Meta tensors hold no data and cannot be copied out, so a pattern
    built on the meta device is kept there (it costs no memory).
    """
    if device == CPU:
        return served, False
    try:
        return pattern_to(built, CPU), True
    except NotImplementedError:
        return served, False


class LRUCache(PatternCache):
    """Thread-safe LRU bounded by entry count and bytes; patterns live on the host.

    A hit holds the lock for one dict lookup, one ``move_to_end`` and a counter; it is
    counted, not timed (a clock pair costs more than the hit). Builds and device copies
    run outside the lock, so two threads missing the same key may both build it: both
    count as misses and the first stored entry wins. A pattern bigger than ``max_bytes``
    is served but not stored (counted as an eviction) rather than flushing the cache.
    """

    name = "cpu"
    SETTINGS = ("max_entries", "max_bytes")
    process_wide = True

    def __init__(self, max_entries: Any = None, max_bytes: Any = None) -> None:
        self._lock = threading.Lock()
        # slot -> (pattern on host, nbytes, whether hits copy it to the slot's device)
        self._store: OrderedDict[Slot, tuple[Pattern, int, bool]] = OrderedDict()
        self._bytes = 0
        self._n = Counters()
        self.max_entries = S.DEFAULT_MAX_ENTRIES
        self.max_bytes = S.DEFAULT_MAX_BYTES
        self.configure(max_entries=max_entries, max_bytes=max_bytes, _defaults=True)

    def configure(self, max_entries: Any = None, max_bytes: Any = None, _defaults: bool = False) -> None:
        """Change the limits of this (shared) instance, evicting down to them at once.

        Settings left as None keep their current value (or, on construction, take the
        environment/built-in default).
        """
        entries = bytes_ = None
        if max_entries is not None or _defaults:
            entries = S.setting("max_entries", max_entries, S.ENV_MAX_ENTRIES, S.DEFAULT_MAX_ENTRIES,
                                S.positive_int)
        if max_bytes is not None or _defaults:
            bytes_ = S.setting("max_bytes", max_bytes, S.ENV_MAX_BYTES, S.DEFAULT_MAX_BYTES, S.byte_size)
        with self._lock:
            if entries is not None:
                self.max_entries = entries
            if bytes_ is not None:
                self.max_bytes = bytes_
            self._trim_locked()

    def get_or_build(self, key: Hashable, build_fn: BuildFn, device: torch.device | str | None) -> Pattern:
        device = as_device(device)
        slot = (key, device)
        with self._lock:
            entry = self._store.get(slot)
            if entry is not None:
                self._store.move_to_end(slot)
                self._n.hits += 1
        if entry is None:
            return self._miss(slot, build_fn, device)
        pattern, nbytes, needs_copy = entry
        if not needs_copy:
            return pattern
        t0 = time.perf_counter()
        out = pattern_to(pattern, device)
        dt = time.perf_counter() - t0
        with self._lock:
            self._n.h2d_copies += 1
            self._n.h2d_bytes += nbytes
            self._n.lookup_s += dt
        return out

    def _miss(self, slot: Slot, build_fn: BuildFn, device: torch.device) -> Pattern:
        built, served, dt = _timed_build(build_fn, device)
        stored, needs_copy = host_copy(built, served, device)
        nbytes = pattern_nbytes(stored)
        with self._lock:
            self._n.misses += 1
            self._n.build_s += dt
            if slot in self._store:
                self._store.move_to_end(slot)
            elif nbytes > self.max_bytes:
                self._n.evictions += 1
            else:
                self._store[slot] = (stored, nbytes, needs_copy)
                self._bytes += nbytes
                self._trim_locked()
        return served

    def _trim_locked(self) -> None:
        store = self._store
        while store and (len(store) > self.max_entries or self._bytes > self.max_bytes):
            _, (_, nbytes, _) = store.popitem(last=False)
            self._bytes -= nbytes
            self._n.evictions += 1

    def stats(self) -> dict[str, float]:
        with self._lock:
            n = len(self._store)
            return self._n.stats(entries=n, bytes=self._bytes, cold_entries=n, cold_bytes=self._bytes)

    def keys(self) -> list[Hashable]:
        """Stored keys, least recently used first."""
        with self._lock:
            return [key for key, _ in self._store]

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self._bytes = 0
