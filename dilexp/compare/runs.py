"""Where runs come from: run records (summary.json) below folders, and their configuration."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dilexp.sweep import RUN_CONTROL, override_items
from dilexp.telemetry.record import SUMMARY

# What identifies a bench case inside a run (the rest of a row is measurement).
CASE_KEYS = ("target", "variant", "role", "op", "seq_len", "batch", "heads", "head_dim", "dtype", "mode", "causal",
             "compare_to")
# Keys that never tell configurations apart: a seed makes repeats, the rest steer the run.
NOT_IDENTITY = frozenset({"seed", *RUN_CONTROL})
# Raw repeats behind a bench figure, for the bootstrap.
RAW_SAMPLES = {"median_ms": "times_ms", "median_ns": "times_ns", "per_call_ns": "times_ns"}


class CompareError(Exception):
    """A problem the user can fix (bad argument, nothing found, W&B offline): one line, exit 2."""


@dataclass
class Run:
    path: str
    status: str
    task: str
    settings: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    bench: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def settings_of(choices: dict[str, Any] | None, overrides: Iterable[str]) -> dict[str, str]:
    """A run's configuration: its config-group choices, then its other command-line overrides."""
    out = {str(k): str(v) for k, v in (choices or {}).items()}
    for key, value in override_items(overrides).items():
        if key in NOT_IDENTITY or key.startswith("hydra.") or key in out:
            continue
        out[key] = value
    return out


def _run_from_summary(path: Path) -> Run:
    folder = str(path.parent)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return Run(folder, "corrupt", "?", _settings_from_hydra(path.parent), error=f"{SUMMARY}: {e}")
    wrong = _wrong_type(data)
    if wrong:
        # Well-formed JSON that is not a run record: say which file and field, and show the run as
        # corrupt instead of failing on it (issue 14, item 9).
        print(f"dilexp.compare: {path}: {wrong}; shown as corrupt", file=sys.stderr)
        return Run(folder, "corrupt", "?", _settings_from_hydra(path.parent), error=f"{SUMMARY}: {wrong}")
    bench = data.get("bench")
    return Run(
        folder, str(data.get("status") or "unknown"), str(data.get("task") or "?"),
        settings_of(data.get("choices"), data.get("overrides") or []),
        metrics=data.get("metrics") if isinstance(data.get("metrics"), dict) else {},
        bench=[r for r in bench if isinstance(r, dict)] if isinstance(bench, list) else [],
        error=data.get("error"),
    )


_SCALAR = (str, int, float, bool, type(None))


# The containers of a run record: field -> (its type, what it must be, its elements' types, what each must be).
_CONTAINERS: dict[str, tuple[type, str, tuple[type, ...], str]] = {
    "choices": (dict, "an object", _SCALAR, "a string"),
    "overrides": (list, "a list of strings", (str,), "a string"),
    "metrics": (dict, "an object", _SCALAR, "a number"),
    "bench": (list, "a list of objects", (dict,), "an object"),
}


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _wrong_type(data: dict[str, Any]) -> str | None:
    """The first field of a summary.json whose type no run record has, described; None if all fit."""
    for key in ("status", "task", "error"):
        if key in data and not isinstance(data[key], _SCALAR):
            return f"field {key!r} is {_kind(data[key])}, expected a string"
    for field_name, (container, what, element, element_what) in _CONTAINERS.items():
        value = data.get(field_name)
        if value is None:
            continue
        if not isinstance(value, container):
            return f"field {field_name!r} is {_kind(value)}, expected {what}"
        keyed = isinstance(value, dict)
        for k, v in value.items() if keyed else enumerate(value):
            name = f"{field_name}.{k}" if keyed else f"{field_name}[{k}]"
            if not isinstance(v, element):
                return f"field '{name}' is {_kind(v)}, expected {element_what}"
            if field_name == "bench":  # a bench row's own values
                for rk, rv in v.items():
                    if not isinstance(rv, (*_SCALAR, list)):
                        return f"field '{name}.{rk}' is {_kind(rv)}, expected a number or string"
    return None


def _settings_from_hydra(folder: Path) -> dict[str, str]:
    try:
        from omegaconf import OmegaConf

        return settings_of({}, [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")])
    except Exception:  # noqa: BLE001 - nothing to go on
        return {}


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run below PATHs: summary.json files, and job folders that never got one."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            files, orphans = [p], []
        elif p.is_dir():
            files = [f for f in p.rglob(SUMMARY) if not _inside_tool_dir(f, p)]
            # A job killed before its record was written still has Hydra's overrides.
            orphans = [h.parent.parent for h in p.rglob(".hydra/overrides.yaml")
                       if not (h.parent.parent / SUMMARY).exists() and not _inside_tool_dir(h.parent, p)]
        else:
            raise CompareError(f"{p}: no such file or folder")
        for f in sorted(files):
            if f.resolve() not in seen:
                seen.add(f.resolve())
                runs.append(_run_from_summary(f))
        for folder in sorted(orphans):
            runs.append(Run(str(folder), "no record", "?", _settings_from_hydra(folder),
                            error="no summary.json (killed before its record was written?)"))
    return runs


def _inside_tool_dir(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts[:-1]
    return any(part in ("wandb", ".submitit", "checkpoints") for part in parts)



def _num(value: Any) -> float | None:
    """A finite float from a record's value ("inf" and numeric strings included), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # "inf" and numeric strings from summary.json
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None
