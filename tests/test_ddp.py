"""hardware=ddp on CPU (gloo, 2 processes): alone, and as a job of a multirun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DDP_CPU = ["hardware=ddp", "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
           "task.max_steps=4", "task.log_every_n_steps=2", "task.val_every_n_steps=2", "task.val_batches=1",
           "task.checkpoint=false", "logger=csv", "model.n_layer=1", "data.seq_len=128"]


def test_ddp_multirun_job_runs_as_its_own_launch(dilexp_cli, tmp_path: Path) -> None:
    # Lightning re-runs the command line in rank 1; inside a sweep that would re-run the
    # sweep. The job must run once, with both ranks, in its own folder.
    sweep = tmp_path / "sweep"
    proc = dilexp_cli(["-m", *DDP_CPU, "attention=sdpa", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(sweep.rglob("summary.json"))
    assert [p.parent.name for p in summaries] == ["0"]
    summary = json.loads(summaries[0].read_text())
    assert summary["status"] == "completed", summary.get("error")
    assert summary["metrics"]["train/steps"] == 4
    assert summary["config"]["hardware"]["devices"] == 2
    # No second sweep was started by the extra rank.
    assert len(list(tmp_path.rglob("multirun.yaml"))) == 1
