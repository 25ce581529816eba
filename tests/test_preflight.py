"""Preflight (dilexp/preflight.py, issue 14 item 7): a job that cannot fit in memory is refused
before any work, in seconds, with one line; task.preflight=false runs it anyway."""

from __future__ import annotations

from pathlib import Path

import pytest

from dilexp import preflight as P
from dilexp.errors import ConfigError
from dilexp.main import CONF_DIR

GIB = 1 << 30


def test_the_estimate_follows_its_stated_formula(compose_cfg) -> None:
    # Counted by hand from the docstring's formula for the tiny model, sdpa on SDPA's math path (fp64).
    cfg = compose_cfg(["attention=sdpa", "data.seq_len=1024", "task.batch_size=2", "hardware.precision=64-true"])
    est = P.estimate(cfg)
    L, H, d, m, V, B, N = 2, 4, 128, 4, 40, 2, 1024
    params = V * d + L * (4 + 2 * m) * d * d
    assert est.parts["parameters + optimizer"] == 16 * params
    assert est.parts["activations"] == B * N * (L * (16 + 2 * m) * d + 3 * V) * 4
    assert est.parts["attention"] == B * 2 * 4 * L * H * N * N  # the dense scores, per layer
    # In fp32 torch picks a fused kernel (O(N), in the activations): no score matrix.
    assert P.estimate(compose_cfg(["attention=sdpa", "data.seq_len=1024"])).parts["attention"] == 0
    # The dilated pattern's buffers grow as N * w / r^2 per branch, not N^2.
    dil = P.estimate(compose_cfg(["attention=dilated", "data.seq_len=1024", "task.batch_size=2"]))
    per_branch_heads = H // 3
    scores = sum(per_branch_heads * N * w / r**2 for w, r in ((64, 1), (128, 2), (256, 4)))
    assert dil.parts["attention"] == B * 2 * 4 * L * scores
    assert dil.parts["attention"] < est.parts["attention"] / 10


def test_a_huge_sequence_is_refused_naming_the_field(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "host_available", lambda: 64.0 * GIB)
    cfg = compose_cfg(["data.seq_len=100000000"])
    with pytest.raises(ConfigError) as err:
        P.preflight(cfg)
    assert err.value.field == "data.seq_len"
    assert "task.preflight=false" in str(err.value) and "GiB" in str(err.value)
    assert P.preflight(compose_cfg(["data.seq_len=100000000", "task.preflight=false"])) is None


@pytest.mark.parametrize(("overrides", "field"), [
    (["attention=sdpa", "data.seq_len=65536", "hardware.precision=64-true"], "data.seq_len"),
    (["attention=sdpa", "data.seq_len=4000000"], "data.seq_len"),
    (["task=bench", "attention=sdpa", "bench.seq_lens=[1024,100000000]"], "bench.seq_lens"),
    (["task=check", "data.seq_len=200000"], "data.seq_len"),
    (["task=eval", "data.seq_len=4000000"], "data.seq_len"),
    (["model=gpt2_124m", "model.d_model=65536", "model.n_head=64"], "model.d_model"),
])
def test_every_task_is_sized(compose_cfg, monkeypatch: pytest.MonkeyPatch, overrides: list[str], field: str) -> None:
    monkeypatch.setattr(P, "host_available", lambda: 16.0 * GIB)
    with pytest.raises(ConfigError) as err:
        P.preflight(compose_cfg(overrides))
    assert err.value.field == field


def test_ranks_on_one_host_share_its_memory(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "host_available", lambda: 16.0 * GIB)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    have, where = P.available(compose_cfg(["hardware=ddp", "hardware.accelerator=cpu"]))
    assert have == 8.0 * GIB and "2 ranks" in where


GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name not in ("hparams_search",))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_passes_preflight(compose_cfg, group: str, option: str) -> None:
    # On this machine's real memory: the defaults, experiments and tests must not be refused.
    cfg = compose_cfg([f"{group}={option}"])
    if str(cfg.hardware.accelerator) == "gpu":
        cfg.hardware.accelerator = "cpu"  # sized against host memory where there is no GPU
    est = P.preflight(cfg)
    assert est is not None and est.total < 8 * GIB


def test_the_cli_refuses_in_seconds_with_one_line(dilexp_cli, tmp_path: Path) -> None:
    proc = dilexp_cli(["data.seq_len=100000000", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dilexp: config error: data.seq_len=100000000"), proc.stderr
    assert not (tmp_path / "run").exists()
