"""End to end, as a user runs it: `python -m dilexp ...` in a temp folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dilexp.telemetry.wandb_reader import find_run_files, history_keys, read_records

pytestmark = pytest.mark.slow


def _only_run_dir(root: Path) -> Path:
    runs = [p.parent for p in root.rglob("summary.json")]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize("attention", ["sdpa", "dilated"])
def test_fast_dev_run(dilexp_cli, tmp_path: Path, attention: str) -> None:
    proc = dilexp_cli([f"attention={attention}", "debug=fast_dev_run", "logger=none"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((_only_run_dir(tmp_path / "outputs") / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["choices"]["attention"] == attention
    assert summary["metrics"]["train/steps"] == 1


def test_default_run_leaves_its_record_and_wandb_keys(dilexp_cli, tmp_path: Path) -> None:
    # The default config, only shorter.
    proc = dilexp_cli(["task.max_steps=12", "task.warmup_steps=2", "task.log_every_n_steps=4",
                       "task.val_every_n_steps=6"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _only_run_dir(tmp_path / "outputs")
    assert f"run folder: {run}" in proc.stderr.replace(str(tmp_path / "outputs"), str(tmp_path / "outputs"))

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    for key in ("torch", "device", "commit"):
        assert key in summary["env"]
    assert summary["metrics"]["perf/tokens_per_s_median"] > 0
    # Learning happens: the last logged loss is below the first (logged at step 1).
    assert summary["metrics"]["train/loss_last"] < summary["metrics"]["train/loss_first"] - 0.3
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert {"train/loss", "val/loss", "val/ppl", "perf/tokens_per_s", "cache/hit_rate"} <= logged
    # The quality figures: chance beside the accuracy (record and console), accuracy by distance.
    m = summary["metrics"]
    assert m["val/chance"] == pytest.approx(1 / 19)
    assert "(chance 0.053," in proc.stdout + proc.stderr
    by_distance = [k for k in m if k.startswith("val/acc_dist/")]
    assert len(by_distance) >= 4 and all(0.0 <= m[k] <= 1.0 for k in by_distance)
    answers = sum(m[k.replace("val/", "val/count_", 1)] for k in by_distance)
    assert answers == 256 * 8  # every answer of the 256 validation sequences, in exactly one bin

    # Read what W&B itself wrote, not what we sent.
    files = find_run_files(run / "wandb")
    assert len(files) == 1
    keys = history_keys(files[0])
    assert "cache/hit_rate" in keys and "perf/tokens_per_s" in keys
    assert any(k.startswith("memory/") for k in keys)
    # ... and the pattern-cache keys, in the run's summary.
    stored = {}
    for rec in read_records(files[0]):
        if rec.WhichOneof("record_type") == "summary":
            stored.update({it.key: json.loads(it.value_json) for it in rec.summary.update if it.key})
    assert any("dilated_idx" in k for k in stored["cache_keys"])


def test_text_file_training(dilexp_cli, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 400)
    proc = dilexp_cli(["attention=sdpa", "model=small", "data=text", f"data.path={corpus}", "data.seq_len=64",
                       "task.max_steps=6", "task.val_every_n_steps=3", "task.log_every_n_steps=3", "logger=csv"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((_only_run_dir(tmp_path / "outputs") / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["choices"]["data"] == "text"
    # Loss by position: bins up to the sequence, with every token of the validation batches counted.
    m = summary["metrics"]
    bins = sorted(k for k in m if k.startswith("val/loss_pos/"))
    assert bins[0] == "val/loss_pos/1-1" and "val/loss_pos/32-63" in bins and len(bins) == 7
    counts = [m[k.replace("val/", "val/count_", 1)] for k in bins]
    assert counts[0] * 64 == sum(counts)  # every position of every sequence, once
    assert all(v > 0 for v in (m[k] for k in bins))


def test_two_job_multirun_two_folders_one_wandb_group(dilexp_cli, tmp_path: Path) -> None:
    proc = dilexp_cli(["-m", "attention=sdpa,dilated", "task.max_steps=3", "task.log_every_n_steps=1",
                       "task.val_every_n_steps=3", "task.val_batches=1", "task.checkpoint=false",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "sweep").rglob("summary.json"))
    assert [j.name for j in jobs] == ["0", "1"]
    groups, run_ids = set(), set()
    for job in jobs:
        assert json.loads((job / "summary.json").read_text())["status"] == "completed"
        files = find_run_files(job / "wandb")
        assert len(files) == 1
        for rec in read_records(files[0]):
            if rec.WhichOneof("record_type") == "run":
                groups.add(rec.run.run_group)
                run_ids.add(rec.run.run_id)
    assert len(run_ids) == 2
    assert len(groups) == 1 and next(iter(groups)).startswith("sweep-")


def test_a_wandb_failure_never_kills_the_run(dilexp_cli, tmp_path: Path) -> None:
    # An invalid mode makes wandb.init raise: the job warns and finishes without W&B.
    proc = dilexp_cli(["debug=fast_dev_run", "logger=wandb"], cwd=tmp_path, env={"WANDB_MODE": "bogus"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B could not start" in proc.stdout + proc.stderr
    summary = json.loads((_only_run_dir(tmp_path / "outputs") / "summary.json").read_text())
    assert summary["status"] == "completed"
