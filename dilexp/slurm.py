"""``launcher=slurm``: dilexp's defaults and one-line errors around hydra-submitit-launcher's SLURM launcher.

conf/launcher/slurm.yaml adds :class:`SlurmPreflight` to ``hydra.callbacks``. Hydra calls it
before it builds the launcher, in the submitting process, so before anything is submitted:

- ``gpus_per_node: null`` (the default) follows the job's hardware: none for ``hardware=cpu``,
  ``hardware.devices`` otherwise. A sweep on a CPU cluster needs no launcher flag, and a GPU
  sweep asks for the GPUs its jobs use.
- What sbatch would refuse is checked against ``sinfo``: GPUs on a partition without any, more
  CPUs or memory than its largest node has, a partition that does not exist. Each is one line
  naming the ``hydra.launcher`` field, and exit 2, instead of submitit's traceback around sbatch's
  error; a refused fresh sweep leaves no folder behind. Where sinfo cannot answer, nothing is
  checked and sbatch has the last word.
- On a cluster without accounting (``sacct`` fails there) job states come from ``squeue``, so
  the sweep does not print a warning every few seconds and still sees a job that died.

In each job (the same callback, in the job's process, only when submitit runs it):

- dilexp's stop signals (dilexp/signals.py) replace submitit's handlers, which only log a
  SIGTERM: ``scancel --signal=TERM`` (or preemption) stops the job at a step end with a
  checkpoint, as ``interrupted``, and the job returns, so its sweep records it and goes on.
- SLURM's time-limit signal (SIGUSR2, ``signal_delay_s`` before ``timeout_min``) stops the job
  the same way; then submitit requeues it (``max_num_timeout`` times at most) with
  ``+resume=true`` added, so the requeued job continues from that checkpoint in the same folder.

(A launcher subclass would be the obvious place, but Hydra only accepts launchers from the
``hydra_plugins`` package.)
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)

FIELD = "hydra.launcher"


class SlurmRefused(Exception):
    """The sweep cannot be submitted as configured (the message is the one line to show)."""


@dataclass(frozen=True)
class Node:
    """One node of a partition as sinfo reports it."""

    cpus: int
    memory_mb: int
    gres: str


def gpus_for_hardware(hardware: Any) -> int:
    """GPUs per node a job of ``hardware`` uses: 0 on CPU, else its device count (1 if not a count)."""
    accelerator = str(hardware.get("accelerator", "cpu")).lower() if hardware is not None else "cpu"
    if accelerator == "cpu":
        return 0
    devices = hardware.get("devices", 1)
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return max(1, len(devices))
    try:
        n = int(str(devices))
    except ValueError:  # "auto": Lightning takes what it finds; one is what can be asked for
        return 1
    return n if n > 0 else 1


def partition_nodes(partition: str | None) -> list[Node] | None:
    """The nodes of a partition (the default one for None); None when sinfo cannot say."""
    cmd = ["sinfo", "--noheader", "--Node", "--format=%c|%m|%G"]
    if partition:
        cmd.append(f"--partition={partition}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    nodes = []
    for line in out.splitlines():
        cpus, mem, gres = (line.split("|") + ["", "", ""])[:3]
        try:
            nodes.append(Node(int(cpus), int(mem.rstrip("+")), gres.strip()))
        except ValueError:
            return None  # a format this code does not know: leave the checking to sbatch
    return nodes


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def preflight(params: dict[str, Any], nodes: list[Node] | None) -> None:
    """Raise :class:`SlurmRefused` for a request no node of the partition can take."""
    partition = params.get("partition")
    where = f"partition {partition!r}" if partition else "the default partition"
    if nodes is None:
        return
    if not nodes:
        raise SlurmRefused(f"{FIELD}.partition={partition}: sinfo lists no such partition "
                           "(set hydra.launcher.partition or SLURM_PARTITION)" if partition else
                           "sinfo lists no default partition: set hydra.launcher.partition (or SLURM_PARTITION)")
    gpus = _int(params.get("gpus_per_node")) + _int(params.get("gpus_per_task"))
    if gpus > 0 and not any("gpu" in n.gres for n in nodes):
        key = "gpus_per_node" if _int(params.get("gpus_per_node")) else "gpus_per_task"
        raise SlurmRefused(f"{FIELD}.{key}={params.get(key)}, but the nodes of {where} have no GPUs: "
                           f"set {FIELD}.{key}=0 (launcher=slurm asks for none with hardware=cpu), "
                           "or choose a partition with GPUs")
    cpus = _int(params.get("cpus_per_task")) * max(1, _int(params.get("tasks_per_node")))
    most_cpus = max(n.cpus for n in nodes)
    if cpus > most_cpus:
        raise SlurmRefused(f"{FIELD}.cpus_per_task={params.get('cpus_per_task')} (x tasks_per_node="
                           f"{params.get('tasks_per_node')}) is more than the {most_cpus} CPUs of the largest "
                           f"node of {where}")
    most_mb = max(n.memory_mb for n in nodes)
    mem_gb = params.get("mem_gb")
    if mem_gb is not None and int(mem_gb) * 1024 > most_mb:
        raise SlurmRefused(f"{FIELD}.mem_gb={mem_gb} is more than the {most_mb // 1024} GB of the largest node "
                           f"of {where}")


def accounting_enabled() -> bool:
    """Whether ``sacct`` works on this cluster (submitit's job watcher uses it)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell: leave submitit as it is
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AccountingStorageType":
            return value.strip() != "accounting_storage/none"
    return True


def use_squeue_watcher() -> None:
    """Job states from squeue instead of sacct, for the SLURM jobs this process submits."""
    from submitit.slurm import slurm

    class SqueueInfoWatcher(slurm.SlurmInfoWatcher):
        # squeue lists a finished job with its final state for MinJobAge (300 s by default);
        # after that the job's result file is what submitit goes by, as it does with sacct.
        def _make_command(self) -> list[str] | None:
            ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
            if not ids:
                return None
            return ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N",
                    f"--jobs={','.join(ids)}"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            return super().read_info("JobID|State|NodeList\n" + text)

    if type(slurm.SlurmJob.watcher).__name__ != "SqueueInfoWatcher":
        slurm.SlurmJob.watcher = SqueueInfoWatcher(delay_s=600)


def _remove_if_fresh(sweep_dir: Path) -> None:
    """Remove the sweep folder a refused command made (no job folder, one start in its history)."""
    from dilexp.sweep import job_folders, load_index

    if not sweep_dir.is_dir() or job_folders(sweep_dir):
        return
    if len(load_index(sweep_dir).get("history", [])) > 1:
        return  # an earlier sweep lives here (a resume): keep its record
    shutil.rmtree(sweep_dir, ignore_errors=True)


def _is_slurm(config: DictConfig) -> bool:
    target = str(config.hydra.launcher.get("_target_", ""))
    return target.endswith("submitit_launcher.SlurmLauncher")


def in_submitit_job() -> bool:
    """Whether this process is a job submitit started (it sets SUBMITIT_FOLDER before the job runs)."""
    return bool(os.environ.get("SUBMITIT_FOLDER"))


# SLURM's signal ahead of the time limit (submitit asks for it with sbatch --signal=USR2@delay).
TIME_LIMIT_SIGNAL = signal.SIGUSR2
# In a job: submitit's handler for that signal (it requeues the job), kept while dilexp's
# stop handling owns the signal, and whether the signal came.
_JOB: dict[str, Any] = {}


def take_over_signals() -> None:
    """In a submitit job: dilexp's stop signals instead of submitit's, the time limit included."""
    from dilexp import signals

    previous = signal.getsignal(TIME_LIMIT_SIGNAL)
    _JOB.clear()
    _JOB.update({"requeue": previous, "time_limit": False})
    signals.install()
    stop = signal.getsignal(signal.SIGTERM)  # dilexp's handler, just installed

    def time_limit(signum: int, frame: Any) -> None:
        _JOB["time_limit"] = True
        if callable(stop):
            stop(signum, frame)

    signal.signal(TIME_LIMIT_SIGNAL, time_limit)


def requeue_after_time_limit(run_dir: Path) -> None:
    """After a job stopped for its time limit: submitit's requeue, the job resuming from its checkpoint.

    submitit's handler requeues the job when ``max_num_timeout`` allows and then exits the
    process; otherwise it raises, and the job stays ``interrupted`` for a ``+resume=true``.
    A job that finished before the signal could stop it is not requeued.
    """
    from dilexp.telemetry.record import read_summary

    requeue = _JOB.get("requeue")
    if not _JOB.get("time_limit") or not callable(requeue):
        return
    if (read_summary(run_dir) or {}).get("status") != "interrupted":
        return
    delayed = getattr(getattr(requeue, "__self__", None), "_delayed", None)
    args = getattr(delayed, "args", None)
    if not args or not isinstance(args[0], list):
        log.warning("submitit's job is not as expected: not requeued")
        return
    from dilexp.sweep import override_items

    if "resume" not in override_items(args[0]):
        args[0].append("+resume=true")
    # The job is over: the time-limit notice again, or SLURM's SIGTERM as it requeues, change nothing.
    for sig in (TIME_LIMIT_SIGNAL, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        requeue(int(TIME_LIMIT_SIGNAL), None)
    except Exception as e:  # noqa: BLE001 - submitit's "not requeued because ...": the job stays interrupted
        print(f"dilexp: not requeued ({e}); resume the sweep with +resume=true", file=sys.stderr, flush=True)


class SlurmPreflight(Callback):
    """Hydra callback (launcher=slurm): GPUs from the hardware, sbatch's refusals as one line."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _is_slurm(config):
            return
        launcher = config.hydra.launcher
        if launcher.get("gpus_per_node") is None:
            # Hydra builds the launcher from this same config right after the callbacks.
            with read_write(config.hydra), open_dict(config.hydra):
                launcher.gpus_per_node = gpus_for_hardware(config.get("hardware"))
        params = {k: launcher.get(k) for k in ("partition", "gpus_per_node", "gpus_per_task", "cpus_per_task",
                                               "tasks_per_node", "mem_gb")}
        try:
            preflight(params, partition_nodes(params["partition"]))
        except SlurmRefused as e:
            _remove_if_fresh(Path(str(config.hydra.sweep.dir)))
            print(f"dilexp: config error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        if not accounting_enabled():
            use_squeue_watcher()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if in_submitit_job():
            take_over_signals()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if in_submitit_job():
            requeue_after_time_limit(Path(str(config.hydra.runtime.output_dir)))
