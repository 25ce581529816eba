"""Check a composed config against ``dilexp.config.schema`` at job start, before any work.

``check_config(cfg)`` walks every node: an undeclared key, a value of the wrong type (a
string in an int field, a non-integer such as 64.5 or 256.5 in an int field, a bool where
a number belongs) or one out of range raises a ConfigError naming the dotted field. Values
that are right but arrive as strings (``oc.env`` always yields strings) are written back
converted, so the recorded config says ``max_entries: 256``, not ``'256'``. A value that
comes from an environment variable names the variable in its error.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from functools import cache
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from dilexp.config import schema as S
from dilexp.errors import ConfigError

_ENV = re.compile(r"\$\{(?:oc\.env|dilexp\.env):([A-Za-z_][A-Za-z0-9_]*)")
_NO_VALUE = object()


class _Mismatch(Exception):
    """A value that does not fit one annotation (the caller may try the next one of a union)."""


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _describe(tp: Any) -> str:
    if tp is S.ByteSize:
        return "a byte count such as 1073741824 or '1GiB'"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_describe(item).removeprefix('an ').removeprefix('a ')}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return "a value"


def _scalar(tp: Any, value: Any) -> Any:
    """``value`` converted to the scalar type ``tp``, or _Mismatch."""
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if value is None or isinstance(value, (DictConfig, ListConfig, dict, list)):
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _Mismatch
    if isinstance(value, bool):
        raise _Mismatch  # bool is an int subclass: `max_steps: true` is a typo, not 1
    if tp is S.ByteSize:
        from dilexp.cache.settings import byte_size

        try:
            return byte_size("", value)
        except ConfigError:
            raise _Mismatch from None
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value.strip(), 10)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    raise _Mismatch from None
        if isinstance(value, float):
            # 1e4 is an integer; 64.5 is not, and truncating it silently ran the wrong job.
            if value.is_integer():
                return int(value)
            raise _Mismatch
        if isinstance(value, int):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)
        raise _Mismatch
    raise TypeError(f"schema annotation {tp!r} is not supported")


def _range(field: str, value: Any, meta: dict[str, Any]) -> None:
    """Raise a ConfigError when ``value`` (or each item of a list) is outside the field's range."""
    items = value if isinstance(value, list) else [value]
    choices = meta.get("choices")
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if choices is not None and v in choices and "ge" not in meta and "gt" not in meta:
                continue
            if "ge" in meta and v < meta["ge"]:
                raise ConfigError(field, value, f"must be >= {meta['ge']}")
            if "gt" in meta and not v > meta["gt"]:
                raise ConfigError(field, value, f"must be > {meta['gt']}")
            if choices is not None and "ge" not in meta and "gt" not in meta and v not in choices:
                raise ConfigError(field, value, f"choose one of {', '.join(dict.fromkeys(map(str, choices)))}")
        elif isinstance(v, str) and choices is not None and v not in choices:
            raise ConfigError(field, value, f"choose one of {', '.join(dict.fromkeys(map(str, choices)))}")
    if "length" in meta and isinstance(value, list) and len(value) != meta["length"]:
        raise ConfigError(field, value, f"expected {meta['length']} values")


def _convert(field: str, tp: Any, value: Any) -> Any:
    """``value`` converted to ``tp`` (dataclass nodes are checked by the caller)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _convert(field, arm, value)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, ListConfig)):
            raise _Mismatch
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(f"{field}[{i}]", item, v))
            except _Mismatch:
                raise ConfigError(field, list(value), f"item {i} ({v!r}) is not {_describe(item)}") from None
        return out
    return _scalar(tp, value)


def _env_var(node: DictConfig, key: str) -> str | None:
    """The environment variable a node's value comes from (``${oc.env:VAR,...}``), if any."""
    raw = OmegaConf.to_container(node, resolve=False).get(key)  # type: ignore[union-attr]
    m = _ENV.search(raw) if isinstance(raw, str) else None
    return m.group(1) if m else None


def _resolve(node: DictConfig, key: str, field: str) -> Any:
    try:
        value = node[key]
    except Exception as e:  # a resolver's error (a bad environment value) arrives wrapped by OmegaConf
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(field, OmegaConf.to_container(node, resolve=False).get(key),  # type: ignore[union-attr]
                          f"cannot be resolved: {e}") from None
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_node(node: DictConfig, cls: type, prefix: str) -> None:
    """Check ``node`` against the dataclass ``cls``, converting values in place."""
    hints = _hints(cls)
    fields = _fields(cls)
    for key in list(node.keys()):
        field = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else \
                f"known here: {', '.join(sorted(fields))}"
            raise ConfigError(field, _resolve(node, key, field), f"unknown key ({hint})")
        tp = hints[key]
        if tp is S.Option:
            continue  # a group node whose schema depends on its option: checked by check_config
        if dataclasses.is_dataclass(tp):
            sub = node[key]
            if sub is None:
                continue
            if not isinstance(sub, DictConfig):
                raise ConfigError(field, sub, "expected a mapping")
            check_node(sub, tp, field)
            continue
        value = _resolve(node, key, field)
        try:
            converted = _convert(field, tp, value)
        except _Mismatch:
            env = _env_var(node, key)
            where = f" (from the environment variable {env})" if env else ""
            if env:
                raise ConfigError(env, value, f"{field} expects {_describe(tp)}") from None
            raise ConfigError(field, value, f"expected {_describe(tp)}{where}") from None
        _range(field, converted, fields[key].metadata)
        raw = OmegaConf.to_container(node, resolve=False)[key]  # type: ignore[index]
        if converted != raw or type(converted) is not type(raw):
            node[key] = converted


def _option_schema(cfg: DictConfig, group: str) -> type | None:
    selector, options = S.SCHEMAS[group]
    node = cfg.get(group)
    if not isinstance(node, DictConfig):
        raise ConfigError(group, node, "expected a mapping (a config group)")
    name = node.get(selector)
    if not isinstance(name, str):
        raise ConfigError(f"{group}.{selector}", name, "expected the name of an option (a string)")
    if name in options:
        return options[name]
    if group == "attention":
        from dilexp.attention import available

        if name in available():
            return None  # a variant registered outside dilexp (tests, plugins): its builder checks it
        raise ConfigError("attention.name", name, f"choose one of {', '.join(sorted(available()))}")
    raise ConfigError(f"{group}.{selector}", name, f"choose one of {', '.join(sorted(options))}")


def check_config(cfg: DictConfig) -> DictConfig:
    """Check every node of a composed job config (in place) and return it.

    Raises ConfigError (one line, naming the field) on the first problem found.
    """
    for group in S.SCHEMAS:
        if group not in cfg:
            continue
        cls = _option_schema(cfg, group)
        if cls is not None:
            check_node(cfg[group], cls, group)
    check_node(cfg, S.Root, "")
    return cfg
