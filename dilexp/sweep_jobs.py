"""Sweep jobs: who a job is (its overrides), which folder holds it, and what the folders say.

Job identity decides both where a job's folder is and whether a resume keeps it; see
``dilexp.sweep`` for how Hydra reaches these through the resolvers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dilexp.telemetry.record import SUMMARY, read_summary

INDEX = "sweep.json"
# Overrides that steer how a sweep runs, not what a job computes: never part of a job's identity.
RUN_CONTROL = frozenset({"resume"})


def override_items(overrides: Iterable[str]) -> dict[str, str]:
    """``key -> value`` of Hydra's per-job override strings.

    The ``+``/``++`` prefixes say how a key got into the config, not what the job computes,
    so ``+x=1`` and ``x=1`` are one setting; a deletion keeps its ``~``.
    """
    out: dict[str, str] = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        if not key.startswith("~"):
            key = key.lstrip("+")
        out[key] = value
    return out


def swept_keys(raw_overrides: Iterable[str]) -> set[str] | None:
    """Keys a command line sweeps over (``a=1,2``, ``range(..)``, ``interval(..)``); None if unparsable."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([str(o) for o in raw_overrides])
    except Exception:  # noqa: BLE001 - unknown sweep: identity falls back to strict matching
        return None
    keys = set()
    for o in parsed:
        if o.is_sweep_override():
            keys.add(o.key_or_group + (f"@{o.package}" if o.package else ""))
    return keys


def same_job(old: Iterable[str], new: Iterable[str], swept: set[str] | None) -> bool:
    """Whether a job that ran with ``old`` overrides is the job ``new`` asks for.

    Every setting of the old job must be there with the same value. A key the old job did
    not have is tolerated when it is a single value on the new command line (not a sweep
    axis): that is how a resume passes a fix (``task.batch_size=4`` for the job that ran out
    of memory) without making every completed job look new. A new sweep axis is never
    tolerated: each of its values is a different job. ``swept=None`` (unknown) is strict.
    """
    a = {k: v for k, v in override_items(old).items() if k not in RUN_CONTROL}
    b = {k: v for k, v in override_items(new).items() if k not in RUN_CONTROL}
    if any(b.get(k) != v for k, v in a.items()):
        return False
    extra = b.keys() - a.keys()
    if swept is None:
        return not extra
    return not (extra & swept)


def truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def job_record(folder: Path) -> tuple[str | None, list[str] | None]:
    """(status, overrides) of a job folder: summary.json first, else Hydra's overrides.yaml."""
    summary = read_summary(folder)
    if summary is not None and isinstance(summary.get("overrides"), list):
        return str(summary.get("status")), [str(o) for o in summary["overrides"]]
    hydra_overrides = folder / ".hydra" / "overrides.yaml"
    if hydra_overrides.is_file():
        try:
            return None, [str(o) for o in OmegaConf.load(hydra_overrides)]
        except Exception:  # noqa: BLE001 - a torn file is a folder without a record
            return None, None
    return None, None


def job_folders(sweep_dir: Path) -> list[Path]:
    """Job folders of a sweep: sub-folders with a run record or Hydra's overrides."""
    if not sweep_dir.is_dir():
        return []
    found = [p for p in sweep_dir.iterdir()
             if p.is_dir() and not p.name.startswith(".")
             and ((p / SUMMARY).is_file() or (p / ".hydra" / "overrides.yaml").is_file())]
    return sorted(found, key=_folder_order)


def _folder_order(p: Path) -> tuple[int, int, str]:
    head, _, tail = p.name.partition("_")
    if head.isdigit():
        return int(head), int(tail) if tail.isdigit() else 0, p.name
    return sys.maxsize, 0, p.name


def load_index(sweep_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((sweep_dir / INDEX).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def sweep_axes(sweep_dir: Path) -> set[str] | None:
    raw = load_index(sweep_dir).get("overrides")
    return swept_keys(raw) if isinstance(raw, list) else None


def find_job_folder(sweep_dir: Path, num: int | str, overrides: list[str], resume: bool) -> tuple[str, bool]:
    """(folder name, kept) for one job of a sweep; kept means: completed earlier, do not run.

    The folder is normally the job number. A resume looks for a completed job with the same
    overrides wherever it is (job numbers move when a sweep's lists change). A folder that
    holds a different job is never reused: the job gets ``<num>_1``, ``<num>_2``, ...
    """
    axes = sweep_axes(sweep_dir)
    own = str(num)
    if resume:
        candidates = [sweep_dir / own, *(p for p in job_folders(sweep_dir) if p.name != own)]
        for folder in candidates:
            status, old = job_record(folder)
            if status == "completed" and old is not None and same_job(old, overrides, axes):
                return folder.name, True
    name, k = own, 0
    while True:
        _, old = job_record(sweep_dir / name)
        if old is None or same_job(old, overrides, axes):
            return name, False
        k += 1
        name = f"{own}_{k}"



def status_counts(jobs: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for j in jobs:
        out[j["status"]] = out.get(j["status"], 0) + 1
    out["kept"] = sum(bool(j.get("kept")) for j in jobs)
    return out

