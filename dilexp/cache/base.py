"""The pattern-cache interface every strategy implements (DESIGN section 4).

Attention code makes exactly one call: ``cache.get_or_build(key, build_fn, device)``.
``build_fn()`` returns a *pattern*: a tensor, a tuple/list/dict of tensors, or any
object with ``.to(device)`` (e.g. a FlexAttention BlockMask). Device is part of the
lookup, not of the key: a pattern built for one device is never served to another.
There is no dtype argument: a ``build_fn`` whose output depends on a dtype must put
that dtype in the key.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

Pattern = Any
BuildFn = Callable[[], Pattern]


def pattern_to(pattern: Pattern, device: torch.device) -> Pattern:
    """Move a pattern (tensor, container of tensors, or object with .to) to ``device``."""
    if isinstance(pattern, torch.Tensor):
        return pattern if pattern.device == device else pattern.to(device)
    if isinstance(pattern, tuple):
        return tuple(pattern_to(p, device) for p in pattern)
    if isinstance(pattern, list):
        return [pattern_to(p, device) for p in pattern]
    if isinstance(pattern, dict):
        return {k: pattern_to(v, device) for k, v in pattern.items()}
    if hasattr(pattern, "to"):
        return pattern.to(device)
    return pattern


def pattern_nbytes(pattern: Pattern) -> int:
    """Bytes held by the tensors of a pattern (0 for plain Python values)."""
    if isinstance(pattern, torch.Tensor):
        return pattern.numel() * pattern.element_size()
    if isinstance(pattern, (tuple, list)):
        return sum(pattern_nbytes(p) for p in pattern)
    if isinstance(pattern, dict):
        return sum(pattern_nbytes(v) for v in pattern.values())
    tensors = [v for v in getattr(pattern, "__dict__", {}).values() if isinstance(v, torch.Tensor)]
    return sum(pattern_nbytes(t) for t in tensors)


# Normalised devices by what callers pass (a str or a torch.device). torch.device()
# plus the checks below cost ~0.45 us, a quarter of the hit budget, so they run once.
_DEVICE_MEMO: dict[Any, torch.device] = {}
_DEVICE_MEMO_MAX = 64
CPU = torch.device("cpu")


def as_device(device: torch.device | str | None) -> torch.device:
    """The lookup form of ``device``: None means CPU, "cuda" means the current CUDA device."""
    try:
        return _DEVICE_MEMO[device]
    except (KeyError, TypeError):
        pass
    if device is None:
        return CPU
    out = torch.device(device)
    if out.type == "cuda" and out.index is None:
        # "cuda" and "cuda:0" must be one lookup key, not two; not memoised because
        # the current device can change between calls.
        return torch.device("cuda", torch.cuda.current_device())
    if len(_DEVICE_MEMO) < _DEVICE_MEMO_MAX:
        _DEVICE_MEMO[device] = out
    return out


# The flat stats every strategy reports (zeros where a counter means nothing for it),
# so runs with different strategies land in the same W&B/CSV columns.
# "hot" = stored on the device it is served on (served as is); "cold" = stored on the
# host and copied to the device on each hit (no copy when the device is the CPU).
STAT_KEYS: tuple[str, ...] = (
    "hits",
    "misses",
    "hit_rate",
    "evictions",
    "entries",
    "bytes",
    "hot_entries",
    "hot_bytes",
    "cold_entries",
    "cold_bytes",
    "promotions",
    "demotions",
    "h2d_copies",
    "h2d_bytes",
    "pregenerated",
    "build_s",
    "lookup_s",
)


def make_stats(**counters: float) -> dict[str, float]:
    """A full stats dict: given counters, zeros for the rest, hit_rate from hits and misses."""
    unknown = set(counters) - set(STAT_KEYS)
    if unknown:
        raise KeyError(f"unknown cache stats {sorted(unknown)}")
    out = {k: float(counters.get(k, 0.0)) for k in STAT_KEYS}
    calls = out["hits"] + out["misses"]
    out["hit_rate"] = out["hits"] / calls if calls else 0.0
    return out


class Counters:
    """The running counters of a strategy (the counter half of ``STAT_KEYS``).

    Levels (entries, bytes, per tier) are read from the stores when stats are taken, so
    ``stats(**levels)`` is the whole flat dict. Callers guard it with their own lock.
    """

    __slots__ = ("hits", "misses", "evictions", "promotions", "demotions", "h2d_copies", "h2d_bytes",
                 "pregenerated", "build_s", "lookup_s")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def stats(self, **levels: float) -> dict[str, float]:
        return make_stats(**{name: getattr(self, name) for name in self.__slots__}, **levels)


def timed_build(build_fn: BuildFn, device: torch.device) -> tuple[Pattern, Pattern, float]:
    """(built, served on ``device``, seconds): a miss's build, and its copy to the device, timed."""
    t0 = time.perf_counter()
    built = build_fn()
    served = pattern_to(built, device)
    return built, served, time.perf_counter() - t0


class PatternCache(ABC):
    """One interface, whatever the strategy.

    Patterns handed out are shared, not copied (a CPU hit returns the stored object):
    callers must treat them as read-only.
    """

    name: str = "base"
    # Settings ``build_cache`` accepts for this strategy (anything else is a ConfigError).
    SETTINGS: ClassVar[tuple[str, ...]] = ()
    # Process-wide strategies: ``build_cache`` returns one shared instance.
    process_wide: ClassVar[bool] = False
    # Whether attention modules should pre-build their patterns inside ``pregenerating()``.
    pregenerate: bool = False

    @abstractmethod
    def get_or_build(self, key: Hashable, build_fn: BuildFn, device: torch.device | str | None) -> Pattern:
        """Return the pattern for ``key`` on ``device``, building it with ``build_fn`` on a miss."""

    @abstractmethod
    def stats(self) -> dict[str, float]:
        """Flat, numeric counters ready to log (hits, misses, hit_rate, ...)."""

    @abstractmethod
    def clear(self) -> None:
        """Drop every stored pattern (counters keep counting)."""

    def keys(self) -> list[Hashable]:
        """The stored keys, one per stored (key, device) slot (e.g. to record them in W&B)."""
        return []

    @contextmanager
    def pregenerating(self) -> Iterator[None]:
        """Context for building patterns ahead of use (``attn.prepare(n, device)``).

        Strategies with pregeneration (``gpu``) store these builds in their fastest tier
        and keep them out of hits/misses; here the calls count as ordinary lookups.
        """
        yield


def merge_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """Sum the counters of several caches (e.g. one `local` cache per layer).

    Ratios are recomputed from the summed counts rather than averaged.
    """
    if not stats:
        return {}
    out: dict[str, float] = {}
    for s in stats:
        for k, v in s.items():
            out[k] = out.get(k, 0.0) + float(v)
    calls = out.get("hits", 0.0) + out.get("misses", 0.0)
    if "hit_rate" in out:
        out["hit_rate"] = out.get("hits", 0.0) / calls if calls else 0.0
    return out


def collect_stats(caches: Iterable[PatternCache]) -> dict[str, float]:
    """Merged stats of the caches of a model, each distinct instance counted once.

    Layers of a process-wide strategy share one instance; summing it once per layer
    would multiply its counters by the number of layers.
    """
    seen: dict[int, PatternCache] = {}
    for cache in caches:
        seen.setdefault(id(cache), cache)
    return merge_stats([c.stats() for c in seen.values()])
