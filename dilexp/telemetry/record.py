"""The run record: summary.json in the run folder (DESIGN section 7).

Written at the start (status "running"), and again at the end ("completed" or
"failed"), always atomically, so a crashed or killed job leaves a readable record.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dilexp
from dilexp.paths import REPO_ROOT

SUMMARY = "summary.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit of the dilexp checkout, when it is one (None for an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def env_info() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "dilexp": dilexp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu: {_cpu_name()}",
        "cuda": torch.version.cuda if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "commit": git_commit(),
    }
    for pkg in ("lightning", "hydra", "wandb"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            info[pkg] = None
    return info


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.item() if x.numel() == 1 else x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``path`` whole or not at all: a failed write (disk full) leaves the old file and no temporary."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class RunRecord:
    """summary.json of one job: status, config choices, figures, environment."""

    def __init__(self, run_dir: str | Path, task: str, choices: dict[str, str], overrides: list[str],
                 config: dict[str, Any]) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / SUMMARY
        self.t0 = time.time()
        self.data: dict[str, Any] = {
            "status": "running",
            "task": task,
            "choices": choices,
            "overrides": overrides,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t0)),
            "finished_at": None,
            "wall_s": None,
            "metrics": {},
            "env": env_info(),
            "config": config,
        }
        self._write()

    def _write(self) -> None:
        # The record must never be what ends a job, least of all its failure handler: a write
        # that fails (ENOSPC, a folder gone read-only) leaves the previous summary.json and says so once.
        try:
            write_json_atomic(self.path, self.data)
        except OSError as e:
            if not getattr(self, "_write_failed", False):
                print(f"dilexp: could not write {self.path} ({e.strerror or e}); it keeps its previous content",
                      file=sys.stderr, flush=True)
            self._write_failed = True

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self._write()

    def finish(self, status: str, error: str | None = None, **fields: Any) -> None:
        self.data.update(fields)
        self.data["status"] = status
        if error is not None:
            self.data["error"] = error
        self.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.data["wall_s"] = round(time.time() - self.t0, 3)
        self._write()


class NoRecord:
    """The record of an extra DDP rank: it writes nothing (rank 0 owns summary.json)."""

    data: dict[str, Any] = {}

    def update(self, **fields: Any) -> None:
        return None

    def finish(self, status: str, error: str | None = None, **fields: Any) -> None:
        return None


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    p = Path(run_dir) / SUMMARY
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
