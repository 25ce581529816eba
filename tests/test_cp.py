"""hardware=cp: a 2-process context-parallel LM run (gloo) equals the same run in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dilexp.errors import ConfigError
from dilexp.main import _prepare

pytestmark = pytest.mark.slow

COMMON = ["attention=ring_v2", "data.seq_len=256", "model.n_layer=1", "task.max_steps=4", "task.log_every_n_steps=2",
          "task.val_every_n_steps=4", "task.val_batches=2", "task.checkpoint=false", "logger=csv"]
CP = ["hardware=cp", "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
      "hardware.timeout_s=120"]


def _summary(root: Path) -> dict:
    files = list(root.rglob("summary.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.mark.parametrize("placement", ["contiguous", "zigzag"])
def test_cp_run_equals_single_process_run(dilexp_cli, tmp_path: Path, placement: str) -> None:
    one = dilexp_cli([*COMMON, f"attention.placement={placement}", f"hydra.run.dir={tmp_path / 'one'}"],
                     cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = dilexp_cli([*COMMON, *CP, f"attention.placement={placement}", f"hydra.run.dir={tmp_path / 'cp'}"],
                     cwd=tmp_path, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _summary(tmp_path / "one"), _summary(tmp_path / "cp")
    assert a["status"] == b["status"] == "completed", (a.get("error"), b.get("error"))
    # Same data, same init, same steps: sharding the sequence must not change the numbers.
    assert b["metrics"]["val/loss"] == pytest.approx(a["metrics"]["val/loss"], abs=1e-4)
    assert b["metrics"]["train/loss"] == pytest.approx(a["metrics"]["train/loss"], abs=1e-4)
    # The 256-token segment spans both shards, so K/V really travelled.
    assert b["metrics"]["ring/bytes_sent"] > 0
    assert a["metrics"]["ring/bytes_sent"] == 0


def test_cp_needs_a_shardable_sequence(compose_cfg) -> None:
    cfg = compose_cfg(["attention=ring_v2", *CP, "hardware.devices=4", "data.seq_len=3", "data.num_pairs=1",
                       "data.num_queries=1"])
    with pytest.raises(ConfigError, match="data.seq_len"):
        _prepare(cfg)
