"""task=eval: a checkpoint read back at the training length and beyond; bad checkpoints refused up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dilexp.errors import ConfigError
from dilexp.main import CONF_DIR, _prepare
from dilexp.tasks.components import build_model

SMALL = ["data.seq_len=64", "data.num_pairs=4", "data.num_queries=4"]


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _fake_run(folder: Path, train_overrides: list[str], config_overrides: list[str] | None = None) -> Path:
    """A run folder as task=train leaves it (checkpoints/last.ckpt + .hydra/config.yaml), without training.

    ``config_overrides``: a .hydra/config.yaml other than the one the weights were built from.
    """
    cfg = _compose(train_overrides)
    model, _ = build_model(cfg, int(cfg.data.get("vocab_size", 256)))  # text: the byte tokenizer's 256
    (folder / "checkpoints").mkdir(parents=True)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 0, "epoch": 0}, folder / "checkpoints" / "last.ckpt")
    (folder / ".hydra").mkdir()
    OmegaConf.save(_compose(config_overrides or train_overrides), folder / ".hydra" / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fake_runs")
    corrupt = root / "corrupt.ckpt"
    good = _fake_run(root / "good", SMALL)
    corrupt.write_bytes((good / "checkpoints" / "last.ckpt").read_bytes()[:1500])  # a cut-off download
    lone = root / "lone" / "weights.ckpt"
    lone.parent.mkdir()
    lone.write_bytes((good / "checkpoints" / "last.ckpt").read_bytes())
    return {
        "good": good,
        "corrupt": corrupt,
        "lone": lone,
        # Weights of d_model=128 beside a training config that says 64.
        "other_shape": _fake_run(root / "other_shape", SMALL, [*SMALL, "model.d_model=64"]),
        "no_ckpt": root,
    }


# ---------------------------------------------------------------- in-process: what _prepare refuses


@pytest.mark.parametrize(("case", "overrides", "says"), [
    ("unset", [], "set it to"),
    ("missing", ["task.ckpt=/nonexistent/run"], "no such file"),
    ("no_ckpt", [], "checkpoints/last.ckpt"),
    ("corrupt", [], "cannot read the checkpoint"),
    ("other_shape", [], "model.d_model: checkpoint 128, config 64"),
    ("lone", ["model=small"], "model.d_model: checkpoint 128, config 256"),
    ("good", ["data.vocab_size=128"], "vocabulary mismatch: the checkpoint has 40 tokens"),
])
def test_bad_checkpoints_name_task_ckpt(fake_runs, case: str, overrides: list[str], says: str) -> None:
    ckpt = [] if case in ("unset", "missing") else [f"task.ckpt={fake_runs[case]}"]
    cfg = _compose(["task=eval", *SMALL, *ckpt, *overrides])
    with pytest.raises(ConfigError) as err:
        _prepare(cfg)
    assert err.value.field == "task.ckpt"
    assert says in str(err.value) and "\n" not in str(err.value)


def test_model_shape_comes_from_the_training_run(fake_runs) -> None:
    # The eval asks for model=small; the run's config (tiny) wins, and the weights load.
    cfg = _compose(["task=eval", *SMALL, f"task.ckpt={fake_runs['good']}", "model=small"])
    prepared = _prepare(cfg)
    assert cfg.model.d_model == 128 and prepared.model.cfg.n_layer == 2
    saved = torch.load(fake_runs["good"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(prepared.model.tok_emb.weight, saved["model.tok_emb.weight"])
    assert prepared.info()["model_from"].endswith(".hydra/config.yaml")
    assert prepared.passkey == ([16, 32, 64, 128], [0.0, 0.25, 0.5, 0.75, 1.0], 32)


@pytest.mark.parametrize(("overrides", "field"), [
    (["task.passkey.depths=[0.5,1.5]"], "task.passkey.depths"),
    (["task.passkey.samples=0"], "task.passkey.samples"),
    (["task.passkey.lengths=[2,64]"], "task.passkey.lengths"),
    (["task.passkey.length_factors=[0.01]"], "task.passkey.length_factors"),
    (["task.val_batches=0"], "task.val_batches"),
    (["hardware.devices=2"], "hardware.devices"),
])
def test_bad_eval_settings_name_their_field(fake_runs, overrides: list[str], field: str) -> None:
    cfg = _compose(["task=eval", *SMALL, f"task.ckpt={fake_runs['good']}", *overrides])
    with pytest.raises(ConfigError) as err:
        _prepare(cfg)
    assert err.value.field == field


# ---------------------------------------------------------------- end to end, as a user runs it


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unset", "missing", "corrupt", "other_shape", "vocab"])
def test_cli_refuses_a_bad_checkpoint_in_one_line(dilexp_cli, fake_runs, tmp_path: Path, case: str) -> None:
    args = {"unset": [], "missing": [f"task.ckpt={tmp_path / 'nowhere'}"],
            "corrupt": [f"task.ckpt={fake_runs['corrupt']}"], "other_shape": [f"task.ckpt={fake_runs['other_shape']}"],
            "vocab": [f"task.ckpt={fake_runs['good']}", "data.vocab_size=128"]}[case]
    run = tmp_path / "run"
    proc = dilexp_cli(["task=eval", *SMALL, *args, "logger=none", f"hydra.run.dir={run}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("dilexp: config error:")]
    assert len(errors) == 1 and "task.ckpt" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not run.exists()


@pytest.mark.slow
def test_eval_at_1x_and_2x_the_training_length(dilexp_cli, tmp_path: Path) -> None:
    trained_run = tmp_path / "train"
    proc = dilexp_cli(["task.max_steps=3", "task.warmup_steps=1", *SMALL, "logger=csv",
                       f"hydra.run.dir={trained_run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()

    sweep = tmp_path / "sweep"
    proc = dilexp_cli(["-m", "task=eval", f"task.ckpt={trained_run}", "data.seq_len=64,128", "data.num_pairs=4",
                       "data.num_queries=4", "logger=csv", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, seq_len in (("0", 64), ("1", 128)):
        run = sweep / job
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed", summary.get("error")
        assert summary["task"] == "eval"
        m = summary["metrics"]
        assert 0.0 <= m["val/acc"] <= 1.0 and m["val/loss"] > 0 and m["val/chance"] > 0
        assert any(k.startswith("val/acc_dist/") for k in m)
        assert summary["config"]["data"]["seq_len"] == seq_len
        assert summary["eval"]["train_seq_len"] == 64 and summary["eval"]["length_ratio"] == seq_len / 64
        assert summary["eval"]["train_steps"] == 3
        pk = summary["passkey"]
        assert pk["lengths"] == [seq_len // 4, seq_len // 2, seq_len, 2 * seq_len]
        assert pk["depths"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert len(pk["acc"]) == 5 and all(len(row) == 4 for row in pk["acc"])
        assert m["passkey/acc"] == pytest.approx(sum(map(sum, pk["acc"])) / 20)
        assert (run / "passkey.png").stat().st_size > 5_000
        assert "val/acc" in (run / "metrics.csv").read_text().splitlines()[0]
        assert (run / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_text_data_skips_the_passkey_with_a_note(dilexp_cli, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 50)
    text = ["data=text", f"data.path={corpus}", "data.seq_len=32"]
    trained = _fake_run(tmp_path / "train", text)
    run = tmp_path / "eval"
    proc = dilexp_cli(["task=eval", f"task.ckpt={trained}", *text, "task.val_batches=1", "logger=none",
                       f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "passkey skipped" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and "passkey" not in summary
    assert summary["metrics"]["val/loss"] > 0
    assert not (run / "passkey.png").exists()
