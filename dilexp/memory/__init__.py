"""Buffer pools behind one interface: ``build_pool(kind, **settings)``."""

from __future__ import annotations

from typing import Any

from dilexp.errors import ConfigError
from dilexp.memory.base import MemoryPool, NoPool, parse_bytes
from dilexp.memory.bucketed import BucketedPool
from dilexp.memory.torch_pool import TorchPool

POOLS: dict[str, type[MemoryPool]] = {"none": NoPool, "bucketed": BucketedPool, "torch": TorchPool}


def build_pool(kind: str, **settings: Any) -> MemoryPool:
    """A new pool of ``kind`` (one per run; every attention module shares it).

    Bad settings raise ConfigError naming ``memory.<field>``.
    """
    if kind not in POOLS:
        raise ConfigError("memory.kind", kind, f"choose one of {sorted(POOLS)}")
    try:
        return POOLS[kind](**settings)
    except TypeError as e:
        raise ConfigError(f"memory.{kind}", settings, str(e)) from e


__all__ = ["MemoryPool", "NoPool", "BucketedPool", "TorchPool", "build_pool", "parse_bytes", "POOLS"]
