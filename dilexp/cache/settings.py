"""Cache settings: coercion of config values, and their environment-variable defaults.

Values may arrive as strings (OmegaConf's ``oc.env`` resolver always yields strings, and
an ``oc.env`` default of ``true`` arrives as ``"True"``), so every setting goes through one
of the parsers here, which raise a ConfigError naming the ``cache.<setting>`` field.
A setting left as None falls back to its environment variable, then to the built-in
default, so ``build_cache("cpu")`` outside Hydra honours the same variables as the yaml.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from dilexp.errors import ConfigError

ENV_MAX_ENTRIES = "PATTERN_CACHE_MAX_SIZE"
ENV_MAX_BYTES = "PATTERN_CACHE_MAX_BYTES"
ENV_HOT_MAX_BYTES = "PATTERN_CACHE_HOT_MAX_BYTES"
ENV_PROMOTE_AFTER = "PATTERN_CACHE_PROMOTE_AFTER"
ENV_PREGENERATE = "PATTERN_CACHE_PREGENERATE"

# The one place these defaults live: conf/cache/{cpu,gpu}.yaml read them through the
# ``${dilexp.env:VAR}`` resolver (dilexp/config), build_cache outside Hydra through ``setting``.
DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_HOT_MAX_BYTES = 256 << 20
DEFAULT_PROMOTE_AFTER = 2
DEFAULT_PREGENERATE = True

_SIZE = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def positive_int(field: str, value: Any) -> int:
    """``value`` as an int >= 1 (ints, integral floats, and their string forms)."""
    if isinstance(value, bool):
        # bool is an int subclass: "max_entries: true" is a typo, not 1.
        raise ConfigError(field, value, "expected a positive integer, got a boolean")
    number: float | int
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip(), 10)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(field, value, "expected a positive integer") from None
    else:
        raise ConfigError(field, value, "expected a positive integer")
    if isinstance(number, float) and not number.is_integer():
        raise ConfigError(field, value, "expected a whole number")
    if number < 1:
        raise ConfigError(field, value, "must be >= 1")
    return int(number)


def byte_size(field: str, value: Any) -> int:
    """Like ``positive_int``, plus size suffixes: KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (1024)."""
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2):
            number, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
            scale = (1024 if binary else 1000) ** (" kmgt".index(unit))
            return positive_int(field, number * scale)
        if m and m.group(4) and not m.group(3):
            return positive_int(field, m.group(1))  # a plain "512B"
    return positive_int(field, value)


def boolean(field: str, value: Any) -> bool:
    """``value`` as a bool: true/false, yes/no, on/off, 1/0 in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ConfigError(field, value, "expected true or false")


# Environment variable -> (default, parser), for the ``dilexp.env`` resolver.
ENV_SETTINGS: dict[str, tuple[Any, Callable[[str, Any], Any]]] = {}


def setting(name: str, value: Any, env: str, default: Any, parse: Callable[[str, Any], Any]) -> Any:
    """Parse a setting, falling back to ``$env`` and then ``default`` when it is None."""
    if value is None:
        value = os.environ.get(env, default)
    return parse(f"cache.{name}", value)


ENV_SETTINGS.update({
    ENV_MAX_ENTRIES: (DEFAULT_MAX_ENTRIES, positive_int),
    ENV_MAX_BYTES: (DEFAULT_MAX_BYTES, byte_size),
    ENV_HOT_MAX_BYTES: (DEFAULT_HOT_MAX_BYTES, byte_size),
    ENV_PROMOTE_AFTER: (DEFAULT_PROMOTE_AFTER, positive_int),
    ENV_PREGENERATE: (DEFAULT_PREGENERATE, boolean),
})
