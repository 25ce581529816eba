"""Checkpoints and resume: last.ckpt in place, task.resume, and a resumed run that equals an uninterrupted one."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dilexp.resume import StartAt, consumed_samples, previous_wandb_id, supersede_offline_runs, trim_metrics_csv
from dilexp.telemetry.wandb_reader import find_run_files, read_records

# A tiny run whose every step is logged; dropout on, so the RNG has to continue too.
TINY = ["attention=sdpa", "data.seq_len=32", "task.batch_size=4", "task.max_steps=40", "task.warmup_steps=4",
        "task.log_every_n_steps=1", "task.val_every_n_steps=4", "task.val_batches=1", "model.dropout=0.1",
        "logger.csv.flush_every=1", "task.checkpoint_every_n_steps=4"]


# -- pieces ----------------------------------------------------------------------------------


def test_start_at_continues_the_epoch_once() -> None:
    s = StartAt(10, 6)
    assert len(s) == 4 and list(s) == [6, 7, 8, 9]
    assert list(s) == list(range(10))  # the next epoch starts from the beginning


def test_consumed_samples() -> None:
    assert consumed_samples(0, 4, 1, 100) == 0
    assert consumed_samples(3, 4, 1, 100) == 12
    assert consumed_samples(3, 4, 2, 100) == 24  # DDP: every rank took a batch per step
    assert consumed_samples(13, 4, 2, 100) == 8  # 12 steps per epoch (drop_last): one step into epoch 2


def test_trim_metrics_csv_drops_rows_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    # Lightning's row N is step N+1's; telemetry's (perf/*) row N is step N's.
    path.write_text("epoch,perf/step_ms,step,train/loss\n0,,0,3.0\n0,,1,2.9\n0,5.0,2,\n0,,2,2.8\n0,,3,2.7\n")
    trim_metrics_csv(tmp_path, 2)
    assert [(r["step"], r["perf/step_ms"]) for r in csv.DictReader(path.open())] == [("0", ""), ("1", ""),
                                                                                     ("2", "5.0")]


def test_wandb_run_folders(tmp_path: Path) -> None:
    wb = tmp_path / "wandb"
    (wb / "offline-run-20260101_000000-aaaa1111").mkdir(parents=True)
    (wb / "offline-run-20260101_000500-bbbb2222").mkdir()
    (wb / "latest-run").mkdir()
    assert previous_wandb_id(tmp_path) == "bbbb2222"
    supersede_offline_runs(tmp_path)
    assert sorted(p.name for p in wb.glob("offline-run-*")) == []
    assert len(list(wb.glob("superseded-offline-run-*"))) == 2


# -- end to end ------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    e.pop("WANDB_API_KEY", None)
    return e


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dilexp", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path} after {timeout}s")
        time.sleep(0.02)


def losses(run: Path, key: str = "train/loss") -> dict[int, float]:
    out: dict[int, float] = {}
    for row in csv.DictReader((run / "metrics.csv").open()):
        if row.get(key) not in ("", None):
            out[int(row["step"])] = float(row[key])
    return out


def wandb_run_ids(folder: Path) -> set[str]:
    ids = set()
    for f in find_run_files(folder):
        for rec in read_records(f):
            if rec.WhichOneof("record_type") == "run":
                ids.add(rec.run.run_id)
    return ids


@pytest.mark.slow
def test_a_killed_and_resumed_run_logs_what_an_uninterrupted_one_does(dilexp_cli, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    proc = dilexp_cli([*TINY, "logger=csv", f"hydra.run.dir={whole}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # A hard kill (no chance to save) right after a periodic checkpoint: the resume starts there.
    run = tmp_path / "killed"
    ckpt = run / "checkpoints" / "last.ckpt"
    p = start([*TINY, f"hydra.run.dir={run}"], tmp_path)
    wait_for(ckpt, p)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    k = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= k < 40 and k % 4 == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    first_id = previous_wandb_id(run)

    proc = dilexp_cli([*TINY, f"hydra.run.dir={run}", "task.resume=auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed"]["step"] == k
    assert summary["metrics"]["train/steps"] == 40

    # Step count, optimizer, LR schedule, data order and RNG all continue: the same losses.
    expect, got = losses(whole), losses(run)
    assert sorted(got) == sorted(expect) == list(range(40))
    for step in expect:
        assert got[step] == pytest.approx(expect[step], abs=1e-5), step
    assert losses(run, "train/lr") == pytest.approx(losses(whole, "train/lr"), abs=1e-9)
    assert losses(run, "val/loss") == pytest.approx(losses(whole, "val/loss"), abs=1e-5)

    # One checkpoint, replaced in place (no last-v1.ckpt), and it is the final step's.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 40
    # The same W&B run continues; the killed attempt's offline folder is set aside, not synced twice.
    wb = run / "wandb"
    live = list(wb.glob("offline-run-*"))
    assert len(live) == 1 and live[0].name.endswith(first_id)
    assert wandb_run_ids(wb) == {first_id} and summary["wandb"]["id"] == first_id
    assert len(list(wb.glob("superseded-offline-run-*"))) == 1


def test_resume_from_a_missing_checkpoint_is_one_line_before_any_work(dilexp_cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = dilexp_cli(["task.resume=/nonexistent/last.ckpt", "logger=csv", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "task.resume" in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists()


@pytest.mark.slow
def test_resume_auto_without_a_checkpoint_starts_afresh(dilexp_cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = dilexp_cli([*TINY, "task.max_steps=4", "task.resume=auto", "logger=csv", f"hydra.run.dir={run}"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and "resumed" not in summary
