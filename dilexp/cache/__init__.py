"""Pattern caches behind one interface: ``build_cache(strategy, **settings)`` (DESIGN section 4).

Strategies:
- ``none``: builds on every call (the control); a new instance per call.
- ``local``: a dict per attention module; a new instance per call.
- ``cpu``: one process-wide thread-safe LRU on the host, copied to the device on each hit.
- ``gpu``: one process-wide two-tier cache (hot tier on the device, cold tier on the host).

The process-wide strategies return their shared instance from every ``build_cache`` call
(the train task calls it once per attention layer); settings given to a later call are
applied to that instance (see ``configure``). Outside Hydra, ``global_cache()`` is the
shared ``cpu`` instance, and ``reset_global_cache()`` forgets the shared instances (and so
their patterns and counters); modules built before keep the instance they were given.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch

from dilexp.cache.base import (
    STAT_KEYS,
    PatternCache,
    as_device,
    collect_stats,
    make_stats,
    merge_stats,
    pattern_nbytes,
    pattern_to,
)
from dilexp.cache.lru import LRUCache
from dilexp.cache.simple import LocalCache, NoCache
from dilexp.cache.tiered import TwoTierCache
from dilexp.errors import ConfigError

STRATEGIES: dict[str, type[PatternCache]] = {
    "none": NoCache,
    "local": LocalCache,
    "cpu": LRUCache,
    "gpu": TwoTierCache,
}

_shared: dict[str, PatternCache] = {}
_shared_lock = threading.Lock()


def build_cache(strategy: str, **settings: Any) -> PatternCache:
    """A cache of ``strategy``: a new one, or the shared one for process-wide strategies.

    ``settings`` are the strategy's config values (strings from ``oc.env`` included);
    unknown or bad ones raise a ConfigError naming ``cache.<setting>``.
    """
    cls = STRATEGIES.get(strategy)
    if cls is None:
        raise ConfigError("cache.strategy", strategy, f"choose one of {sorted(STRATEGIES)}")
    for name, value in settings.items():
        if name not in cls.SETTINGS:
            known = ", ".join(cls.SETTINGS) or "none"
            reason = f"not a setting of strategy {strategy!r} (known: {known})"
            raise ConfigError(f"cache.{name}", value, reason)
    if not cls.process_wide:
        return cls(**settings)
    with _shared_lock:
        cache = _shared.get(strategy)
        if cache is None:
            cache = _shared[strategy] = cls(**settings)
        elif settings:
            cache.configure(**settings)  # type: ignore[attr-defined]
        return cache


def pregenerate_patterns(modules: Iterable[Any], n: int, device: torch.device | str | None,
                         causal: bool | None = None) -> int:
    """Pre-build the patterns of every attention module whose cache asks for it.

    ``causal``: the mask the calls will use (a language model's: True); None builds both.
    Calls ``module.prepare(n, device, causal)`` inside ``module.cache.pregenerating()`` for each
    module whose cache has ``pregenerate`` set (``cache=gpu`` by default), so those
    builds land in the hot tier and stay out of hit/miss counts. Returns how many
    modules were prepared.
    """
    prepared = 0
    for module in modules:
        cache = getattr(module, "cache", None)
        if isinstance(cache, PatternCache) and cache.pregenerate and hasattr(module, "prepare"):
            with cache.pregenerating():
                module.prepare(n, device, causal)
            prepared += 1
    return prepared


def global_cache() -> LRUCache:
    """The process-wide ``cpu`` cache (created with environment/default limits if needed)."""
    cache = build_cache("cpu")
    assert isinstance(cache, LRUCache)
    return cache


def reset_global_cache() -> None:
    """Forget the process-wide instances (``cpu`` and ``gpu``), their patterns and counters.

    The next ``build_cache``/``global_cache`` call creates fresh ones, e.g. between the
    jobs of a multirun that share one process.
    """
    with _shared_lock:
        _shared.clear()


__all__ = [
    "STAT_KEYS",
    "STRATEGIES",
    "LRUCache",
    "LocalCache",
    "NoCache",
    "PatternCache",
    "TwoTierCache",
    "as_device",
    "build_cache",
    "collect_stats",
    "global_cache",
    "make_stats",
    "merge_stats",
    "pattern_nbytes",
    "pattern_to",
    "pregenerate_patterns",
    "reset_global_cache",
]
