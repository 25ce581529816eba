"""task=check: the certificate for every variant, single process and over gloo ranks, and its failure exit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dilexp.attention import available, capabilities
from dilexp.errors import ConfigError
from dilexp.main import _prepare
from dilexp.tasks.check import run_check
from dilexp.telemetry.record import NoRecord

TESTS = Path(__file__).resolve().parent
CPU2 = ["hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true", "hardware.threads=1",
        "++hardware.timeout_s=120"]


def _small(name: str) -> list[str]:
    over = ["task=check", "data.seq_len=96", "model.n_head=4", "model.d_model=32", "task.batch_size=1",
            f"attention={name}"]
    if capabilities(name).pattern == "dilated":
        over.append("attention.segment_lengths=[16,32,64]")  # segments span the 2-rank shards of 96
    if capabilities(name).pattern == "block_sparse":
        over.append("attention.block_size=16")
    return over


@pytest.mark.parametrize("name", available())
def test_every_variant_passes_its_certificate_in_one_process(compose_cfg, name: str, capsys) -> None:
    cfg = compose_cfg(_small(name))
    result = run_check(cfg, None, _prepare(cfg), NoRecord())
    m = result["metrics"]
    assert result["exit_code"] == 0 and m["check/passed"] == 1.0, m
    printed = capsys.readouterr().out
    assert "PASS" in printed and f"attention={name}" in printed
    caps = capabilities(name)
    expect = {"out"} | ({"dq", "dk", "dv"} if caps.backward_on("cpu") else set()) | ({"lse"} if caps.lse else set())
    assert {k.split("/")[1] for k in m if k.endswith("/max_abs") and not k.startswith("check/dense")} == expect
    for key in expect:
        assert m[f"check/{key}/max_abs"] <= 1e-4 and m[f"check/{key}/bitwise"] == 1.0, (key, m)
        assert m[f"check/{key}/max_rel"] <= 1e-4
    if not caps.backward_on("cpu"):
        assert "no backward" in printed


def test_bf16_uses_the_bf16_tolerance_and_reports_the_dense_error(compose_cfg) -> None:
    cfg = compose_cfg([*_small("improved"), "hardware.precision=bf16-mixed"])
    m = run_check(cfg, None, _prepare(cfg), NoRecord())["metrics"]
    assert m["check/tol"] == 2e-2 and m["check/passed"] == 1.0
    assert 0 < m["check/out/max_abs"] <= 2e-2 and m["check/dense/out/max_abs"] > 0


def test_tol_override_fails_the_check(compose_cfg, capsys) -> None:
    cfg = compose_cfg([*_small("ring_v2"), "task.check.tol=1e-12"])
    result = run_check(cfg, None, _prepare(cfg), NoRecord())
    assert result["exit_code"] == 1 and result["metrics"]["check/passed"] == 0.0
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "field"),
    [(["task.check.repeats=0"], "task.check.repeats"),
     (["task.check.tol=-1"], "task.check.tol"),
     (["task.batch_size=0"], "task.batch_size"),
     (["hardware.precision=8-bit"], "hardware.precision"),
     (["attention=dilated", "hardware=cp", *CPU2], "attention.name"),
     (["attention=ring_v2", "hardware=cp", *CPU2, "data.seq_len=1"], "data.seq_len"),
     (["attention.dilation_rates=[1,2]"], "attention.dilation_rates")],
)
def test_bad_settings_name_the_field(compose_cfg, overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        _prepare(compose_cfg(["task=check", *overrides]))
    assert e.value.field == field


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_cli_fails_with_exit_1_on_a_broken_variant(dilexp_cli, tmp_path: Path) -> None:
    # A variant registered only in the launched process (tests/broken_variant_main.py).
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    args = [*_small("sdpa"), "attention.name=broken", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = dilexp_cli(args, cwd=tmp_path, env=env, module="broken_variant_main", timeout=200)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "FAIL: out, dq, dk, dv above tol 0.0001" in proc.stdout, proc.stdout
    summary = _summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["metrics"]["check/passed"] == 0.0
    assert summary["metrics"]["check/out/max_abs"] > 1e-3
    # The same command on the real sdpa passes.
    ok = dilexp_cli([*_small("sdpa"), "logger=csv", f"hydra.run.dir={tmp_path / 'ok'}"], cwd=tmp_path, timeout=200)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert _summary(tmp_path / "ok")["metrics"]["check/passed"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("hardware", "name"), [("cp", "ring_v3"), ("ddp", "sdpa")])
def test_cli_over_two_gloo_ranks(dilexp_cli, tmp_path: Path, hardware: str, name: str) -> None:
    run = tmp_path / "run"
    proc = dilexp_cli([*_small(name), f"hardware={hardware}", *CPU2, "logger=csv", f"hydra.run.dir={run}"],
                      cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS" in proc.stdout and f"{hardware} over 2 ranks" in proc.stdout, proc.stdout
    m = _summary(run)["metrics"]
    assert m["check/world"] == 2.0 and m["check/passed"] == 1.0
    assert all(m[f"check/{k}/bitwise"] == 1.0 for k in ("out", "dq", "dk", "dv"))
    if hardware == "cp":
        assert m["check/lse/max_abs"] <= 1e-4
    else:
        assert m["check/ranks_bitwise_equal"] == 1.0
