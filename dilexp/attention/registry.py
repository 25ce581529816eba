"""Names -> builders. ``build("dilated", num_heads=8, head_dim=64, segment_lengths=[...], ...)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from dilexp.attention.base import Attention, Capabilities
from dilexp.errors import ConfigError

_REGISTRY: dict[str, type[Attention]] = {}


def register(name: str) -> Callable[[type[Attention]], type[Attention]]:
    def deco(cls: type[Attention]) -> type[Attention]:
        if name in _REGISTRY:
            raise RuntimeError(f"attention variant {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def capabilities(name: str) -> Capabilities:
    """What variant ``name`` declares it can do (``Attention.capabilities``)."""
    if name not in _REGISTRY:
        raise ConfigError("attention.name", name, f"unknown variant; choose one of {available()}")
    return _REGISTRY[name].capabilities


def with_capability(**wanted: object) -> list[str]:
    """Registered variants whose capabilities match, e.g. ``with_capability(process_groups=True)``."""
    return [n for n in available() if all(getattr(_REGISTRY[n].capabilities, k) == v for k, v in wanted.items())]


def unregister(name: str) -> None:
    """Remove a variant (tests register throw-away variants and must clean up)."""
    _REGISTRY.pop(name, None)


def settings_of(name: str) -> set[str] | None:
    """The settings variant ``name`` takes (None: it takes any)."""
    params = inspect.signature(_REGISTRY[name].__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - {"self"}


def build(name: str, **cfg: Any) -> Attention:
    """Build a variant by name; unknown settings fail naming ``attention.<key>``."""
    if name not in _REGISTRY:
        raise ConfigError("attention.name", name, f"unknown variant; choose one of {available()}")
    cls = _REGISTRY[name]
    accepted = settings_of(name)
    if accepted is not None:
        unknown = sorted(set(cfg) - accepted)
        if unknown:
            raise ConfigError(f"attention.{unknown[0]}", cfg[unknown[0]], f"not a setting of {name!r}")
    return cls(**cfg)
