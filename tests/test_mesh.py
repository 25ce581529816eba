"""hardware=cp with a (dp x cp) mesh on CPU (gloo): the mesh, sharding and accumulation do not change the numbers.

Every run trains the same tiny model from the same seed on the same global batch (8 sequences:
dp replicas x batch_size x accumulation) for 10 steps; the train loss of each step and the
validation loss (after steps 5 and 10, over the same 16 sequences) must agree within 1e-4.
A sharded (2 x 2) checkpoint after 5 steps resumed under (2 x 2) continues with the same losses;
under another mesh it is refused (one line, exit 2).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dilexp.data.module import Strided
from dilexp.errors import ConfigError
from dilexp.main import _prepare

# A constant learning rate: a 5-step run and a 10-step run share their first 5 updates.
COMMON = ["attention=ring_v2", "data.seq_len=64", "model.n_layer=1", "model.d_model=64", "task.log_every_n_steps=1",
          "task.val_every_n_steps=5", "task.warmup_steps=0", "task.min_lr_ratio=1.0", "logger=csv",
          "hardware.accelerator=cpu", "hardware.precision=32-true"]


def _cp(devices: int, cp_size: int, *more: str) -> list[str]:
    # Per replica 4 sequences and 2 val batches: with 2 replicas, a global batch of 8 and 16 val sequences.
    return ["hardware=cp", f"hardware.devices={devices}", f"hardware.cp_size={cp_size}", "hardware.timeout_s=120",
            "task.batch_size=4", "task.val_batches=2", *more]


# One process, two micro-batches of 4 per step and 4 val batches of 4: the same sequences.
ONE_PROCESS = ["task.batch_size=4", "task.accumulate_grad_batches=2", "task.val_batches=4"]


def _losses(run: Path) -> tuple[dict[int, float], dict[int, float], dict]:
    """(train loss by step, val loss by step, summary) of a finished run."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    train, val = {}, {}
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                train[int(row["step"])] = float(row["train/loss"])
            if row.get("val/loss"):
                val[int(row["step"])] = float(row["val/loss"])
    return train, val, summary


def _run(dilexp_cli, tmp_path: Path, name: str, args: list[str]) -> tuple[dict[int, float], dict[int, float], dict]:
    more = [] if any(a.startswith("task.max_steps=") for a in args) else ["task.max_steps=10"]
    more += [] if any(a.startswith("task.checkpoint=") for a in args) else ["task.checkpoint=false"]
    proc = dilexp_cli([*COMMON, *more, *args, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(tmp_path / name)


def _same(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys() and a, (a, b)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), (step, a, b)


@pytest.mark.slow
def test_mesh_2x2_equals_2x1_one_process_sharded_and_resumed(dilexp_cli, tmp_path: Path) -> None:
    train_22, val_22, s22 = _run(dilexp_cli, tmp_path, "dp2_cp2", _cp(4, 2))
    train_21, val_21, _ = _run(dilexp_cli, tmp_path, "dp2_cp1", _cp(2, 1))
    train_1, val_1, _ = _run(dilexp_cli, tmp_path, "one", ONE_PROCESS)
    train_sh, val_sh, ssh = _run(dilexp_cli, tmp_path, "dp2_cp2_sharded", _cp(4, 2, "hardware.shard_model=true"))
    assert len(train_22) == 10 and len(val_22) == 2
    _same(train_22, train_21)
    _same(train_22, train_sh)
    _same(val_22, val_21)
    # One process validates every 5 micro-batches (steps 2, 4, 7, 9); steps 4 and 9 are shared.
    _same(val_22, {step: val_1[step] for step in val_22})
    _same(val_22, val_sh)
    # Under accumulation a step's logged train loss is its last micro-batch's: the val losses,
    # which follow every update, carry the comparison with one process.
    # The mesh is in the summary; per-device throughput is the total over 4 devices.
    m = s22["metrics"]
    assert (m["mesh/dp"], m["mesh/cp"]) == (2.0, 2.0)
    assert m["perf/tokens_per_s_per_device_median"] == pytest.approx(m["perf/tokens_per_s_median"] / 4)
    # The ring really ran across the cp pair (a 64-token sequence over 2 ranks).
    assert m["ring/bytes_sent"] > 0
    assert ssh["metrics"]["mesh/dp"] == 2.0
    # Sharded over 2 replicas: each rank holds about half the parameters, gradients and Adam state.
    full, sharded = m["memory/model_state_mb"], ssh["metrics"]["memory/model_state_mb"]
    assert 0.4 * full < sharded < 0.6 * full, (full, sharded)

    # A (2 x 2) sharded checkpoint after 5 steps resumes under (2 x 2) to the uninterrupted run's losses.
    first, _, _ = _run(dilexp_cli, tmp_path, "first5", _cp(4, 2, "hardware.shard_model=true", "task.max_steps=5",
                                                           "task.checkpoint=true"))
    ckpt = tmp_path / "first5" / "checkpoints" / "last.ckpt"
    resumed, _, sr = _run(dilexp_cli, tmp_path, "resumed", _cp(4, 2, "hardware.shard_model=true",
                                                               f"task.resume={ckpt}"))
    whole = [train_sh[k] for k in sorted(train_sh)]
    assert [first[k] for k in sorted(first)] == pytest.approx(whole[:5], abs=1e-4)
    assert [resumed[k] for k in sorted(resumed)] == pytest.approx(whole[5:], abs=1e-4)
    assert sr["metrics"]["train/steps"] == 10
    # Another mesh: one line naming the field, exit 2, before any work.
    proc = dilexp_cli([*COMMON, *_cp(4, 1, "hardware.shard_model=true", f"task.resume={ckpt}"),
                       f"hydra.run.dir={tmp_path / 'other_mesh'}"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "hardware.cp_size" in line]
    assert len(said) == 1 and "(dp 2 x cp 2" in said[0], proc.stderr[-2000:]


def test_strided_sampler_splits_the_global_order() -> None:
    # Two replicas' i-th samples are the single-process order's 2i and 2i + 1.
    a, b = list(Strided(10, 2, 0)), list(Strided(10, 2, 1))
    assert a == [0, 2, 4, 6, 8] and b == [1, 3, 5, 7, 9]
    assert sorted(list(Strided(7, 2, 0)) + list(Strided(7, 2, 1))) == list(range(6))
    assert len(Strided(7, 2, 1)) == 3
    # Resumed at global sample 4: the replicas continue the same global order, then start over.
    late = Strided(10, 2, 1, start=4)
    assert len(late) == 3 and list(late) == [5, 7, 9] and list(late) == [1, 3, 5, 7, 9]


@pytest.mark.parametrize(("overrides", "field", "says"), [
    (["hardware.devices=4", "hardware.cp_size=3"], "hardware.cp_size", "must divide the world"),
    (["hardware.devices=4", "hardware.cp_size=0"], "hardware.cp_size", "must divide the world"),
    (["hardware.devices=2", "hardware.num_nodes=2", "hardware.cp_size=8"], "hardware.cp_size", "= 4"),
    (["hardware.devices=4", "hardware.cp_size=4", "data.seq_len=66"], "hardware.cp_size", "data.seq_len=66"),
    (["hardware.devices=2", "hardware.shard_model=yes"], "hardware.shard_model", "true or false"),
])
def test_bad_mesh_names_the_field(compose_cfg, overrides: list[str], field: str, says: str) -> None:
    cfg = compose_cfg(["attention=ring_v2", "hardware=cp", "hardware.accelerator=cpu", *overrides])
    with pytest.raises(ConfigError, match=field) as err:
        _prepare(cfg)
    assert says in str(err.value)


def test_mesh_defaults_to_one_replica(compose_cfg) -> None:
    # hardware=cp without cp_size: the whole world is one context-parallel group, as before meshes.
    cfg = compose_cfg(["attention=ring_v2", "hardware=cp", "hardware.accelerator=cpu", "hardware.devices=4"])
    cp = _prepare(cfg).cp
    assert (cp.dp, cp.world, cp.shard_model) == (1, 4, False)
    cfg = compose_cfg(["attention=sdpa", "hardware=cp", "hardware.accelerator=cpu", "hardware.devices=4",
                       "hardware.cp_size=1", "hardware.shard_model=true"])
    cp = _prepare(cfg).cp
    assert (cp.dp, cp.world, cp.shard_model) == (4, 1, True)


@pytest.mark.slow
def test_bad_mesh_is_one_line_and_exit_2(dilexp_cli, tmp_path: Path) -> None:
    proc = dilexp_cli([*COMMON, *_cp(4, 3), f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "hardware.cp_size" in line]
    assert len(said) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
