"""A 2-task SLURM job (tasks_per_node=2, gloo) on the tests' one-node cluster: one rank per task,
started by SLURM (Lightning's SLURMEnvironment), the ring across the two tasks, one run record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The cluster fixture of the SLURM tests (tests/slurm/start.sh): this module gets its own cluster.
try:
    from test_slurm import FITS, slurm  # noqa: F401
except ImportError:  # a checkout without the SLURM tests
    pytest.skip("needs tests/test_slurm.py (the SLURM test cluster)", allow_module_level=True)


def test_two_task_job_is_one_mesh(slurm: dict[str, str], dilexp_cli, tmp_path: Path) -> None:  # noqa: F811
    sweep = tmp_path / "sweep"
    # tasks_per_node follows hardware.devices (conf/launcher/slurm.yaml): 2 tasks, one rank each.
    proc = dilexp_cli(["-m", "launcher=slurm", *FITS, "hardware=cp",
                       "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
                       "hardware.timeout_s=120", "attention=ring_v2", "data.seq_len=64", "task.max_steps=5",
                       "task.log_every_n_steps=1", "task.val_every_n_steps=5", "task.val_batches=1", "logger=csv",
                       f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=slurm, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 jobs: 1 completed" in proc.stderr
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    # SLURM started both ranks (no Lightning re-launch inside a task), and they formed one ring.
    assert summary["mesh"] == {"dp": 1, "cp": 2, "world": 2, "shard_model": False, "nodes": 1,
                               "cluster": "SLURMEnvironment"}
    assert summary["metrics"]["ring/bytes_sent"] > 0
    assert summary["metrics"]["train/steps"] == 5
    # Both tasks of the one SLURM job ran it; only the first wrote the record and said so.
    logs = sorted((sweep / ".submitit").rglob("*_log.err"))
    assert len(logs) == 2, logs
    said = [p for p in logs if "dilexp: run folder" in p.read_text()]
    assert len(said) == 1, [p.read_text()[-500:] for p in logs]
