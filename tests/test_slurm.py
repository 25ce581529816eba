"""launcher=slurm against a real one-node SLURM (tests/slurm/start.sh): a sweep as a job array,
requests the cluster cannot meet, a job stopped by scancel or by its time limit and continued
from its checkpoint; and the preflight's rules without a cluster.

The cluster fixture starts munged, slurmctld and slurmd as root for this module and stops them at
the end; where that cannot be done (not root, no slurm-wlm/munge packages: .ci/run installs them)
the cluster tests skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dilexp.slurm import Node, SlurmRefused, gpus_for_hardware, preflight
from dilexp.sweep import INDEX

SCRIPTS = Path(__file__).resolve().parent / "slurm"

# Tiny jobs: a few seconds each on one CPU.
TINY = ["task.max_steps=5", "data.seq_len=32", "task.log_every_n_steps=1", "task.val_every_n_steps=5",
        "task.val_batches=1", "logger=csv"]
# What this one-node cluster can give a job (its node has at least 1 CPU and 4 GB).
FITS = ["hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4"]


def _free_port_pair() -> int:
    """A port p with p and p+1 free (slurmctld, slurmd): two test sessions never share a cluster."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free adjacent ports")


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A running one-node cluster (partition `debug`); yields the environment that reaches it."""
    folder = Path(tempfile.mkdtemp(prefix="dilexp-slurm-"))
    env = {"DILEXP_SLURM_PORT": str(_free_port_pair())}
    try:
        proc = subprocess.run(["bash", str(SCRIPTS / "start.sh"), str(folder)], capture_output=True, text=True,
                              timeout=120, env={**os.environ, **env})
        if proc.returncode == 3:
            pytest.skip(proc.stderr.strip().splitlines()[-1])
        assert proc.returncode == 0, f"SLURM did not start:\n{proc.stderr[-3000:]}\n{_logs(folder)}"
        yield {"SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop.sh"), str(folder)], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((folder / "log").glob("*.log")))


def _index(sweep: Path) -> dict:
    return json.loads((sweep / INDEX).read_text())


# -- a sweep through launcher=slurm ----------------------------------------------------------


@pytest.mark.slow
def test_sweep_runs_as_slurm_jobs(slurm: dict[str, str], dilexp_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # No hydra.launcher.gpus_per_node: with hardware=cpu the jobs ask for no GPU, which is what
    # lets them run on this cluster at all.
    proc = dilexp_cli(["-m", "launcher=slurm", *FITS, "attention=sdpa,dilated", *TINY, f"hydra.sweep.dir={sweep}"],
                      cwd=tmp_path, env=slurm, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 jobs: 2 completed" in proc.stderr
    # Accounting is off here: job states come from squeue, not a sacct warning every poll.
    assert "sacct" not in proc.stderr and "accounting storage is disabled" not in proc.stderr

    index = _index(sweep)
    assert index["launcher"] == "SlurmLauncher"
    jobs = sorted(index["jobs"], key=lambda j: j["num"])
    assert [(j["num"], j["folder"], j["status"]) for j in jobs] == [(0, "0", "completed"), (1, "1", "completed")]
    assert ["attention=sdpa" in j["overrides"] for j in jobs] == [True, False]
    assert all(j["metrics"].get("val/loss") is not None for j in jobs)
    assert index["counts"]["completed"] == 2 and index["finished_at"]
    for num in (0, 1):
        summary = json.loads((sweep / str(num) / "summary.json").read_text())
        assert summary["status"] == "completed"
    # They ran as tasks of one SLURM job array (submitit's logs are named <array>_<task>_log.*),
    # asking for no GPU.
    logs = sorted(p.name for p in (sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2 and {name.split("_")[1] for name in logs} == {"0", "1"}, logs
    script = next((sweep / ".submitit").rglob("*_submission.sh")).read_text()
    assert "--gpus-per-node=0" in script or "gpus-per-node" not in script, script


# -- what sbatch would refuse: one line, exit 2, no folder ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "says"), [
    # The case: a GPU asked of a cluster without GPUs.
    (["hydra.launcher.gpus_per_node=1"], "set hydra.launcher.gpus_per_node=0"),
    # conf/launcher/slurm.yaml's default of 8 CPUs on a small node.
    (["hydra.launcher.cpus_per_task=8"], "hydra.launcher.cpus_per_task=8"),
    (["hydra.launcher.partition=nosuch"], "hydra.launcher.partition=nosuch"),
    # (hardware=gpu and mem_gb: the same sinfo checks, in the unit tests below.)
])
def test_a_request_the_cluster_cannot_meet_is_one_line(slurm: dict[str, str], dilexp_cli, tmp_path: Path,
                                                      overrides: list[str], says: str) -> None:
    sweep = tmp_path / "sweep"
    proc = dilexp_cli(["-m", "launcher=slurm", *FITS, *overrides, "attention=sdpa,dilated", *TINY,
                       f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=slurm, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dilexp: config error: ") and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "sbatch" not in proc.stderr
    assert not sweep.exists()
    # Nothing was submitted.
    queue = subprocess.run(["squeue", "--noheader", "--states=all"], capture_output=True, text=True,
                           env={**os.environ, **slurm})
    assert "sweep" not in queue.stdout


# -- preemption and the time limit: interrupted with a checkpoint, then continued -----------------

# Long enough to be caught mid-run (150 steps of 20-100 ms after a few seconds of start-up), with a
# checkpoint every 10 steps.
LONG = ["task.max_steps=150", "data.seq_len=32", "task.log_every_n_steps=10", "task.val_every_n_steps=150",
        "task.val_batches=1", "logger=csv", "task.checkpoint_every_n_steps=10"]
LAST_CKPT = Path("checkpoints") / "last.ckpt"


def _start_sweep(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python -m dilexp ARGS` in the background (tests/conftest.py's run_dilexp waits for it)."""
    e = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
         "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "dilexp", *args], cwd=cwd, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {path} was written:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path} after {timeout} s")
        time.sleep(0.1)


def _slurm_job(sweep: Path, num: int) -> str:
    """The SLURM id of a sweep's job (``<array>_<task>``, or ``<id>`` for a one-job sweep): Hydra's record."""
    from omegaconf import OmegaConf

    return str(OmegaConf.load(sweep / str(num) / ".hydra" / "hydra.yaml").hydra.job.id)


def _scancel(signal_name: str, job: str, env: dict[str, str]) -> None:
    # Without --batch/--full scancel signals the job's steps: submitit's `srun python ...`.
    subprocess.run(["scancel", f"--signal={signal_name}", job], check=True, env={**os.environ, **env})


@pytest.mark.slow
def test_scancel_term_interrupts_a_job_and_resume_continues_it(slurm: dict[str, str], tmp_path: Path,
                                                               dilexp_cli) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "launcher=slurm", *FITS, "attention=sdpa,dilated", *LONG, f"hydra.sweep.dir={sweep}"]
    proc = _start_sweep(args, tmp_path, slurm)
    _wait_for(sweep / "0" / LAST_CKPT, proc, timeout=120)
    _scancel("TERM", _slurm_job(sweep, 0), slurm)
    _, err = proc.communicate(timeout=180)
    # The sweep goes on: job 1 completes, job 0 is recorded as stopped, and the resume command is printed.
    assert proc.returncode == 0, err[-4000:]
    assert "+resume=true" in err

    stopped = json.loads((sweep / "0" / "summary.json").read_text())
    assert stopped["status"] == "interrupted", stopped.get("error")
    assert stopped["interrupted"]["signal"] == "SIGTERM"
    step = stopped["interrupted"]["step"]
    assert 10 <= step < 150 and stopped["interrupted"]["checkpoint"]
    index = _index(sweep)
    assert {j["folder"]: j["status"] for j in index["jobs"]} == {"0": "interrupted", "1": "completed"}

    proc2 = dilexp_cli([*args[:-1], f"hydra.sweep.dir={sweep}", "+resume=true"], cwd=tmp_path, env=slurm,
                       timeout=240)
    assert proc2.returncode == 0, proc2.stderr[-4000:]
    resumed = json.loads((sweep / "0" / "summary.json").read_text())
    assert resumed["status"] == "completed"
    # It continued from the checkpoint the stop wrote, not from step 0.
    assert resumed["resumed"]["step"] == step
    index = _index(sweep)
    assert {j["folder"]: (j["status"], j["kept"]) for j in index["jobs"]} == {
        "0": ("completed", False), "1": ("completed", True)}
    assert "2 jobs: 1 completed, 1 kept" in proc2.stderr


@pytest.mark.slow
def test_a_job_at_its_time_limit_is_requeued_and_continues(slurm: dict[str, str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # timeout_min=1: submitit then takes any time-limit signal as a time-out. SLURM itself sends
    # SIGUSR2 signal_delay_s before the limit; the test sends that signal once the job has a
    # checkpoint instead of waiting for SLURM's 30-second timer. signal_delay_s=5 keeps SLURM's own
    # notice out of the requeued run's way.
    args = ["-m", "launcher=slurm", *FITS, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5",
            "hydra.launcher.max_num_timeout=1", "attention=sdpa", *LONG, f"hydra.sweep.dir={sweep}"]
    proc = _start_sweep(args, tmp_path, slurm)
    _wait_for(sweep / "0" / LAST_CKPT, proc, timeout=120)
    job = _slurm_job(sweep, 0)
    _scancel("USR2", job, slurm)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]

    # The first run stopped at a step end with a checkpoint, and submitit requeued the job ...
    log = "".join(p.read_text() for p in sorted((sweep / ".submitit").rglob("*_0_log.*")))
    stopped = re.search(r"interrupted by SIGUSR2 at step (\d+); checkpoint", log)
    assert stopped and "Requeued job" in log, log[-3000:]
    assert "Traceback" not in log
    # ... which ran again in the same folder, from that checkpoint, to the end.
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    assert summary["resumed"]["step"] == int(stopped.group(1)) > 0
    assert "+resume=true" in summary["overrides"]
    index = _index(sweep)
    assert [(j["folder"], j["status"]) for j in index["jobs"]] == [("0", "completed")]
    assert "1 jobs: 1 completed" in err


# -- the preflight's rules, without a cluster ------------------------------------------------


@pytest.mark.parametrize(("hardware", "gpus"), [
    ({"accelerator": "cpu", "devices": 2}, 0),
    ({"accelerator": "gpu", "devices": 1}, 1),
    ({"accelerator": "gpu", "devices": 4}, 4),
    ({"accelerator": "cuda", "devices": [0, 2]}, 2),
    ({"accelerator": "auto", "devices": "auto"}, 1),
    ({"accelerator": "gpu", "devices": -1}, 1),
])
def test_gpus_per_node_follows_the_hardware(hardware: dict, gpus: int) -> None:
    assert gpus_for_hardware(hardware) == gpus


@pytest.mark.parametrize(("hardware", "nodes", "gpus"), [
    ("cpu", "cpu", 0),
    ("gpu", "gpu", 1),
    ("gpu", "cpu", None),  # refused: one line, exit 2
])
def test_the_callback_fills_in_gpus_and_refuses(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               hardware: str, nodes: str, gpus: int | None) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import dilexp.slurm as slurm_mod
    from dilexp.paths import CONF_DIR

    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    monkeypatch.setattr(slurm_mod, "partition_nodes", lambda partition: BIG_CPU_NODE if nodes == "cpu" else GPU_NODES)
    monkeypatch.setattr(slurm_mod, "accounting_enabled", lambda: True)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=["launcher=slurm", f"hardware={hardware}"],
                          return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    assert cfg.hydra.launcher.gpus_per_node is None  # the yaml leaves it to the hardware
    callback = slurm_mod.SlurmPreflight()
    if gpus is None:
        with pytest.raises(SystemExit) as exc:
            callback.on_multirun_start(cfg)
        assert exc.value.code == 2
        assert "set hydra.launcher.gpus_per_node=0" in capsys.readouterr().err
    else:
        callback.on_multirun_start(cfg)
        assert cfg.hydra.launcher.gpus_per_node == gpus


CPU_NODE = [Node(cpus=2, memory_mb=24000, gres="(null)")]
# Big enough for conf/launcher/slurm.yaml's defaults (8 CPUs, 64 GB).
BIG_CPU_NODE = [Node(cpus=64, memory_mb=512000, gres="(null)")]
GPU_NODES = [Node(cpus=2, memory_mb=24000, gres="(null)"), Node(cpus=64, memory_mb=512000, gres="gpu:a100:8(S:0-1)")]
OK = {"partition": "debug", "gpus_per_node": 0, "cpus_per_task": 1, "tasks_per_node": 1, "mem_gb": 4}


@pytest.mark.parametrize(("change", "nodes", "field"), [
    ({}, CPU_NODE, None),
    ({"gpus_per_node": 1}, CPU_NODE, "gpus_per_node"),
    ({"gpus_per_task": 1}, CPU_NODE, "gpus_per_task"),
    ({"gpus_per_node": 8, "cpus_per_task": 64, "mem_gb": 400}, GPU_NODES, None),
    ({"cpus_per_task": 3}, CPU_NODE, "cpus_per_task"),
    ({"cpus_per_task": 2, "tasks_per_node": 2}, CPU_NODE, "cpus_per_task"),
    ({"mem_gb": 64}, CPU_NODE, "mem_gb"),
    ({"mem_gb": None, "cpus_per_task": None}, CPU_NODE, None),
    ({}, [], "partition"),
    ({"gpus_per_node": 1}, None, None),  # sinfo could not answer: sbatch decides
])
def test_preflight(change: dict, nodes: list[Node] | None, field: str | None) -> None:
    params = {**OK, **change}
    if field is None:
        preflight(params, nodes)
        return
    with pytest.raises(SlurmRefused, match=rf"hydra\.launcher\.{field}"):
        preflight(params, nodes)
