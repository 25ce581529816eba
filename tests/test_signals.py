"""Stop signals end a run or a sweep as `interrupted`; failures leave records (a sweep's own-launch
job, a full disk, a read-only output folder)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from test_resume import start, wait_for

from dilexp.telemetry.record import RunRecord, read_summary


@pytest.fixture
def handlers():
    from dilexp import signals

    signals.reset()
    signals.install()
    yield signals
    signals.uninstall()
    signals.reset()


def test_outside_training_a_signal_stops_at_once(handlers) -> None:
    with pytest.raises(handlers.Interrupted) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.value.signum == signal.SIGUSR1 and stop.value.exit_code == 128 + signal.SIGUSR1


def test_in_training_a_signal_is_noted_and_a_second_one_stops_at_once(handlers) -> None:
    class Connector:
        received_sigterm = True  # as Lightning's own SIGTERM handler leaves it

    class Trainer:
        _signal_connector = Connector()

    trainer = Trainer()
    handlers.graceful(trainer)
    os.kill(os.getpid(), signal.SIGTERM)
    assert handlers.received() == signal.SIGTERM
    assert trainer._signal_connector.received_sigterm is False  # our step end decides, not Lightning
    os.kill(os.getpid(), signal.SIGTERM)  # the same stop delivered twice at once: still graceful
    with pytest.raises(handlers.Interrupted):
        os.kill(os.getpid(), signal.SIGINT)


LONG = ["attention=sdpa", "data.seq_len=32", "task.batch_size=4", "task.max_steps=100000", "task.warmup_steps=2",
        "task.log_every_n_steps=1", "task.val_every_n_steps=1000", "task.val_batches=1",
        "task.checkpoint_every_n_steps=2"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_signal_ends_a_run_as_interrupted_with_a_checkpoint(tmp_path: Path, sig: signal.Signals) -> None:
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    p = start([*LONG, "logger=csv", f"hydra.run.dir={run}"], tmp_path)
    wait_for(ckpt, p)
    os.kill(p.pid, sig)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, out[-3000:]
    summary = read_summary(run)
    assert summary is not None and summary["status"] == "interrupted"
    step = summary["interrupted"]["step"]
    assert summary["interrupted"]["signal"] == sig.name and step >= 2
    # The checkpoint was written at the step the run stopped, and the console says how to resume.
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == step
    assert f"interrupted by {sig.name}" in out and "task.resume=auto" in out
    assert "Traceback" not in out


SWEEP = ["-m", "seed=1,2,3", "attention=sdpa", "data.seq_len=32", "task.batch_size=4", "task.max_steps=60",
         "task.warmup_steps=2", "task.log_every_n_steps=1", "task.val_every_n_steps=1000", "task.val_batches=1",
         "task.checkpoint_every_n_steps=2", "logger=[csv,wandb]"]


@pytest.mark.slow
def test_sigterm_stops_a_sweep_and_resume_finishes_it(dilexp_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    p = start([*SWEEP, f"hydra.sweep.dir={sweep}"], tmp_path)
    # Job 1 (seed=2) is killed once it has a checkpoint; job 0 completed; job 2 never starts.
    wait_for(sweep / "1" / "checkpoints" / "last.ckpt", p)
    os.kill(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
    index = json.loads((sweep / "sweep.json").read_text())
    assert [(j["folder"], j["status"]) for j in index["jobs"]] == [("0", "completed"), ("1", "interrupted")]
    assert index["interrupted"]["signal"] == "SIGTERM" and index["interrupted"]["job"] == "1"
    assert [o for o in index["not_run"][0] if o.startswith("seed=")] == ["seed=3"] and len(index["not_run"]) == 1
    assert "1 interrupted" in out and "1 jobs did not run" in out and "+resume=true" in out
    step = read_summary(sweep / "1")["interrupted"]["step"]
    assert step >= 2

    proc = dilexp_cli([*SWEEP, f"hydra.sweep.dir={sweep}", "+resume=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((sweep / "sweep.json").read_text())
    assert [(j["folder"], j["status"], j["kept"]) for j in index["jobs"]] == [
        ("0", "completed", True), ("1", "completed", False), ("2", "completed", False)]
    resumed = read_summary(sweep / "1")
    assert resumed["resumed"]["step"] == step and resumed["metrics"]["train/steps"] == 60
    # One live offline W&B run per job: the interrupted attempt's is set aside, the sync line skips it.
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 3
    assert len(list(sweep.glob("1/wandb/superseded-offline-run-*"))) == 1
    assert "wandb sync" in proc.stderr


@pytest.mark.slow
def test_a_failed_own_launch_job_stays_in_its_sweep(dilexp_cli, tmp_path: Path) -> None:
    # A context-parallel job runs as its own launch; sdpa there is a config error in that child.
    sweep = tmp_path / "sweep"
    proc = dilexp_cli(["-m", "hardware=cp", "hardware.accelerator=cpu", "hardware.devices=2",
                       "hardware.precision=32-true", "attention=sdpa", "task.max_steps=3", "data.seq_len=256",
                       "logger=csv", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    index = json.loads((sweep / "sweep.json").read_text())
    assert [(j["folder"], j["status"]) for j in index["jobs"]] == [("0", "failed")], proc.stderr[-3000:]
    assert "ConfigError" in index["jobs"][0]["error"]
    assert (sweep / "0" / "summary.json").is_file()
    assert "1 jobs: 0 completed, 1 failed" in proc.stderr


# -- disk full, read-only folders ------------------------------------------------------------


def test_a_full_disk_never_crashes_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    record = RunRecord(tmp_path, "train", {}, [], {})
    before = (tmp_path / "summary.json").read_text()

    def full(self: Path, *args: object, **kwargs: object) -> int:
        # What ENOSPC does: the temporary file is made, then the write fails.
        Path.touch(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    record.finish("failed", error="RuntimeError: boom")  # the failure handler itself must not raise
    record.update(metrics={"x": 1.0})
    monkeypatch.undo()
    assert (tmp_path / "summary.json").read_text() == before  # the previous record, whole
    assert not (tmp_path / "summary.json.tmp").exists()
    err = capsys.readouterr().err
    assert err.count("could not write") == 1 and "No space left" in err


@pytest.fixture
def read_only_dir(tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    # root writes through file modes: only a read-only mount says no.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("running as root and cannot mount a read-only tmpfs")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_a_read_only_output_folder_is_one_line(dilexp_cli, tmp_path: Path, read_only_dir: Path, key: str) -> None:
    args = ["-m"] if key == "hydra.sweep.dir" else []
    proc = dilexp_cli([*args, "debug=fast_dev_run", "logger=none", f"{key}={read_only_dir / 'out'}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr
