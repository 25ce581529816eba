"""Sweeps: job identity, job folders, resume, the sweep index, Optuna and launcher configs;
and a real sweep with a failing job, its resume and its comparison."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from dilexp.sweep import (
    INDEX,
    find_job_folder,
    kept_result,
    objective,
    override_items,
    same_job,
    swept_keys,
)

# -- identity and folders (no Hydra run) -----------------------------------------------------


def test_override_items_ignore_how_a_key_was_added() -> None:
    assert override_items(["+resume=True", "++attention.heads=all", "a=1", "~b", "c=x=y"]) == {
        "resume": "True", "attention.heads": "all", "a": "1", "~b": "", "c": "x=y"}


def test_swept_keys_are_the_sweep_axes() -> None:
    raw = ["attention=sdpa,dilated", "data.seq_len=range(64,129,64)", "task.lr=interval(0.1,1)",
           "task.max_steps=2", "+resume=true"]
    assert swept_keys(raw) == {"attention", "data.seq_len", "task.lr"}


def test_same_job() -> None:
    old = ["attention=dilated", "model.n_head=2", "task.max_steps=2"]
    axes = {"attention", "model.n_head"}
    assert same_job(old, [*old, "+resume=True"], axes)
    assert not same_job(old, ["attention=dilated", "model.n_head=4", "task.max_steps=2"], axes)
    assert not same_job(old, ["attention=dilated", "model.n_head=2"], axes)  # a setting dropped
    # A single value added on the resume command is a fix, not a new job ...
    assert same_job(old, [*old, "++attention.heads=all"], axes)
    # ... a new sweep axis is: each of its values is a different job.
    assert not same_job(old, [*old, "cache=cpu"], axes | {"cache"})
    # Without the sweep's command line, nothing is tolerated.
    assert not same_job(old, [*old, "++attention.heads=all"], None)


def _job(sweep: Path, name: str, overrides: list[str], status: str = "completed") -> Path:
    folder = sweep / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"status": status, "overrides": overrides,
                                                     "metrics": {"val/loss": 2.5}}))
    return folder


def test_job_folders_resume_by_overrides_and_never_mix_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / INDEX).write_text(json.dumps({"overrides": ["attention=sdpa,dilated,improved", "task.max_steps=2"]}))
    _job(sweep, "0", ["attention=sdpa", "task.max_steps=2"])
    _job(sweep, "1", ["attention=dilated", "task.max_steps=2"], status="failed")
    # The lists changed: sdpa is now job 1. Resume finds it in folder 0 and keeps it.
    assert find_job_folder(sweep, 1, ["attention=sdpa", "task.max_steps=2", "+resume=True"], True) == ("0", True)
    # The failed job runs again, in its own folder.
    assert find_job_folder(sweep, 1, ["attention=dilated", "task.max_steps=2"], True) == ("1", False)
    # A new job whose number's folder holds another job gets a folder of its own.
    assert find_job_folder(sweep, 0, ["attention=improved", "task.max_steps=2"], True) == ("0_1", False)
    assert find_job_folder(sweep, 2, ["attention=improved", "task.max_steps=2"], False) == ("2", False)
    # Without resume a completed job's folder is rerun in place (plain Hydra behaviour).
    assert find_job_folder(sweep, 0, ["attention=sdpa", "task.max_steps=2"], False) == ("0", False)

    kept = kept_result(sweep / "0", sweep, ["attention=sdpa", "task.max_steps=2", "+resume=True"])
    assert kept is not None and kept["kept"] and kept["metrics"] == {"val/loss": 2.5}
    assert kept_result(sweep / "1", sweep, ["attention=dilated", "task.max_steps=2"]) is None


def test_objective_is_the_named_metric() -> None:
    cfg = OmegaConf.create({"optimized_metric": "val/loss"})
    assert objective(cfg, {"metrics": {"val/loss": 2.5}}) == 2.5
    assert objective(cfg, None) is None  # a failed job: Optuna records a failed trial
    assert objective(cfg, {"metrics": {"train/loss": 1.0}}) is None
    assert objective(OmegaConf.create({}), {"metrics": {"val/loss": 2.5}}) is None


# -- configs compose (Hydra compose API, plugins installed) ----------------------------------


def _hydra_cfg(overrides: list[str]) -> DictConfig:
    """The composed config with its hydra node (compose_cfg drops it); the compose_cfg
    fixture of a test using this clears Hydra's global state afterwards."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dilexp.main import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(("name", "metric"), [("step_time", "perf/step_ms_median"), ("val_loss", "val/loss")])
def test_optuna_search_configs_compose(compose_cfg, name: str, metric: str) -> None:
    cfg = _hydra_cfg([f"hparams_search={name}"])
    assert cfg.optimized_metric == metric
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["direction"] == "minimize" and sweeper["max_failure_rate"] == 1.0
    assert sweeper["params"] and sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler"


@pytest.mark.parametrize(("name", "target"), [("slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher"),
                                              ("local", "BasicLauncher")])
def test_launcher_configs_compose(compose_cfg, monkeypatch: pytest.MonkeyPatch, name: str, target: str) -> None:
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    cfg = _hydra_cfg([f"launcher={name}", "hardware=gpu"])
    assert cfg.hydra.launcher._target_.endswith(target)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    if name == "slurm":
        # null: dilexp.slurm.SlurmPreflight fills in the hardware's GPU count (tests/test_slurm.py)
        assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] is None
        assert "slurm_preflight" in cfg.hydra.callbacks
        assert launcher["submitit_folder"].endswith("/.submitit/%j")


def test_sweep_folders_of_two_sweeps_differ_and_jobs_share_theirs(compose_cfg) -> None:
    a = _hydra_cfg([])
    b = _hydra_cfg([])
    # Composed in the same second: the microseconds differ, and so would the random suffix.
    assert str(a.hydra.sweep.dir) != str(b.hydra.sweep.dir)
    assert str(a.hydra.sweep.dir) == str(a.hydra.sweep.dir)  # cached: one folder per sweep


# -- a real sweep ----------------------------------------------------------------------------

SMALL = ["data.seq_len=32", "task.max_steps=2", "task.log_every_n_steps=1", "task.val_every_n_steps=2",
         "task.val_batches=1", "task.checkpoint=false", "logger=csv"]
# attention=dilated with 2 heads and 3 segment lengths is a ConfigError ("grouped" needs a
# head per segment length): one failing job of four, for a real reason.
SWEEP = ["-m", "attention=sdpa,dilated", "model.n_head=2,4", *SMALL]


def _summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


@pytest.mark.slow
def test_sweep_survives_a_failure_resumes_and_compares(dilexp_cli, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    proc = dilexp_cli([*SWEEP, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _summaries(sweep)
    assert sorted(jobs) == ["0", "1", "2", "3"]
    assert [jobs[k]["status"] for k in "0123"] == ["completed", "completed", "failed", "completed"]
    assert "model.n_head" in jobs["2"]["error"] and "ConfigError" in jobs["2"]["error"]

    index = json.loads((sweep / INDEX).read_text())
    assert [(j["num"], j["folder"], j["status"]) for j in index["jobs"]] == [
        (0, "0", "completed"), (1, "1", "completed"), (2, "2", "failed"), (3, "3", "completed")]
    assert index["counts"]["failed"] == 1 and index["jobs"][0]["metrics"]["val/loss"] > 0
    assert "attention=dilated" in index["jobs"][2]["overrides"]
    # The end-of-sweep screen: what failed, where the index is, how to resume.
    assert "1 failed" in proc.stderr and "resume:" in proc.stderr and str(sweep / INDEX) in proc.stderr

    before = {k: (sweep / k / "summary.json").stat().st_mtime_ns for k in "013"}
    hydra_before = (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    # Resume with the fix for the failed job: every head sees every segment length.
    proc = dilexp_cli([*SWEEP, f"hydra.sweep.dir={sweep}", "+resume=true", "++attention.heads=all"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _summaries(sweep)
    assert sorted(jobs) == ["0", "1", "2", "3"]
    assert all(j["status"] == "completed" for j in jobs.values())
    assert {k: (sweep / k / "summary.json").stat().st_mtime_ns for k in "013"} == before  # not run again
    assert (sweep / "0" / ".hydra" / "overrides.yaml").read_text() == hydra_before  # record untouched
    assert "++attention.heads=all" in jobs["2"]["overrides"]
    index = json.loads((sweep / INDEX).read_text())
    assert [j["kept"] for j in index["jobs"]] == [True, True, False, True]
    assert index["counts"] == {"completed": 4, "kept": 3}
    assert len(index["history"]) == 2 and index["resume"] is True

    # Compare: four rows, ratios against sdpa with the same head count, md/csv/png written.
    from dilexp.compare import main as compare

    md, table_csv, png = tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "t.png"
    assert compare([str(sweep), "--baseline", "attention=sdpa", "--width", "200"]) == 0
    out = capsys.readouterr().out
    assert out.count("completed") == 4 and "ratio" in out
    assert compare([str(sweep), "--baseline", "attention=sdpa", "--out", str(md)]) == 0
    assert compare([str(sweep), "--baseline", "attention=sdpa", "--out", str(table_csv), "--plot", str(png),
                    "--x", "model.n_head", "--y", "perf/step_ms_median"]) == 0
    rows = list(csv.DictReader(table_csv.open()))
    assert len(rows) == 4
    for r in rows:
        step = float(r["perf/step_ms_median"])
        base = next(float(b["perf/step_ms_median"]) for b in rows
                    if b["attention"] == "sdpa" and b["model.n_head"] == r["model.n_head"])
        assert float(r["ratio"]) == pytest.approx(step / base)
    assert md.read_text().count("| completed |") == 4
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_runtime_failure_is_recorded_and_the_sweep_exits_cleanly(dilexp_cli, tmp_path: Path) -> None:
    # An invalid precision passes the config checks and fails when Lightning builds its Trainer.
    sweep = tmp_path / "sweep"
    proc = dilexp_cli(["-m", "attention=sdpa", "hardware.precision=bogus", *SMALL, f"hydra.sweep.dir={sweep}"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summaries(sweep)["0"]
    assert summary["status"] == "failed" and "bogus" in summary["error"]
    index = json.loads((sweep / INDEX).read_text())
    assert index["jobs"][0]["status"] == "failed" and index["counts"] == {"failed": 1, "kept": 0}


@pytest.mark.slow
def test_optuna_search_gets_the_metric_from_each_job(dilexp_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "search"
    proc = dilexp_cli(["hparams_search=step_time", "hydra.sweeper.n_trials=2", *SMALL, f"hydra.sweep.dir={sweep}"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert float(best.best_value) > 0
    steps = [j["metrics"]["perf/step_ms_median"] for j in _summaries(sweep).values()]
    assert len(steps) == 2 and float(best.best_value) == pytest.approx(min(steps))
    assert os.path.isfile(sweep / INDEX)
