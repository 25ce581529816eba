"""`python -m dilexp` / `dilexp`: the Hydra entry point.

One job = validate (every object built from the config, before any work) -> run the task
-> write the run record. A bad setting is one line naming the field and exit code 2;
in a multirun a failing job is recorded as failed and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import traceback
from typing import Any

import hydra
from omegaconf import DictConfig

import dilexp.config  # noqa: F401  (registers the dilexp.env resolver, also for --cfg)
import dilexp.sweep  # noqa: F401  (registers the resolvers the Hydra config uses, also for --cfg)
from dilexp import signals
from dilexp.config import check_config
from dilexp.errors import ConfigError
from dilexp.paths import CONF_DIR
from dilexp.preflight import preflight
from dilexp.tasks.context import JobContext, resolved

log = logging.getLogger("dilexp")
# Set for a job that a sweep runs as its own launch (_run_as_own_launch): its errors keep a record.
SWEEP_JOB_ENV = "DILEXP_SWEEP_JOB"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prepare(cfg: DictConfig) -> Any:
    name = str(cfg.task.name)
    if name == "train":
        from dilexp.tasks.train import Prepared

        return Prepared(cfg)
    if name == "bench":
        from dilexp.tasks.bench import PreparedBench

        return PreparedBench(cfg)
    if name == "eval":
        from dilexp.tasks.eval import PreparedEval

        return PreparedEval(cfg)
    if name == "check":
        from dilexp.tasks.check import PreparedCheck

        return PreparedCheck(cfg)
    raise ConfigError("task.name", name, "choose 'train', 'bench', 'eval' or 'check'")


def _run(cfg: DictConfig, ctx: JobContext, prepared: Any, record: Any) -> dict[str, Any]:
    if cfg.task.name == "train":
        from dilexp.tasks.train import run_train

        return run_train(cfg, ctx, prepared, record)
    if cfg.task.name == "eval":
        from dilexp.tasks.eval import run_eval

        return run_eval(cfg, ctx, prepared, record)
    if cfg.task.name == "check":
        from dilexp.tasks.check import run_check

        return run_check(cfg, ctx, prepared, record)
    from dilexp.tasks.bench import run_bench

    return run_bench(cfg, ctx, prepared, record)


def is_launched_rank() -> bool:
    """True in the extra ranks Lightning's DDP launcher starts (they re-run this entry point),
    and in the SLURM tasks other than the first of a multi-task job (one task per device)."""
    slurm_rank = int(os.environ.get("SLURM_PROCID", "0")) if int(os.environ.get("SLURM_NTASKS", "1")) > 1 else 0
    return int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0 or slurm_rank != 0


def is_multiprocess(cfg: DictConfig) -> bool:
    hw = cfg.hardware
    devices = hw.get("devices", 1)
    many = isinstance(devices, (list, tuple)) or str(devices) in ("-1", "auto") or int(str(devices)) > 1
    return many or int(hw.get("num_nodes", 1)) > 1


def _run_as_own_launch(ctx: JobContext) -> dict[str, Any] | None:
    """A multi-process job inside a multirun runs as a single run in a child process.

    Lightning's DDP launcher re-runs the command line in each extra rank; inside a
    sweep that command line is the whole sweep. As its own `python -m dilexp` the job's
    ranks re-run just the job, in the job's folder.
    """
    import subprocess

    from dilexp.telemetry.record import RunRecord, read_summary

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    env[SWEEP_JOB_ENV] = "1"
    cmd = [sys.executable, "-m", "dilexp", *ctx.overrides, f"hydra.run.dir={ctx.run_dir}"]
    proc = subprocess.Popen(cmd, env=env)
    stop: signals.Interrupted | None = None
    while True:
        try:
            returncode = proc.wait()
            break
        except signals.Interrupted as e:
            # The sweep was told to stop: the job stops the same way (its checkpoint), then the sweep.
            stop = stop or e
            with contextlib.suppress(OSError):
                proc.send_signal(e.signum)
    summary = read_summary(ctx.run_dir) or {}
    if summary.get("status") in (None, "running"):
        # The job died before it could say why (a crash, a kill): the sweep must still list it.
        RunRecord(ctx.run_dir, str(summary.get("task") or "train"), ctx.choices, ctx.overrides,
                  summary.get("config") or {}).finish("failed", error=f"job process exited with {returncode}")
        summary = read_summary(ctx.run_dir) or {}
    if stop is not None or summary.get("status") == "interrupted":
        raise stop or signals.Interrupted(returncode - 128 if returncode > 128 else int(signal.SIGTERM),
                                          (summary.get("interrupted") or {}).get("step"))
    if returncode != 0:
        _say(f"dilexp: job {ctx.job_num} exited with {returncode}; record in {ctx.run_dir}")
    return summary if summary.get("status") == "completed" else None


def _config_failed(cfg: DictConfig, ctx: JobContext, e: ConfigError) -> None:
    """A bad setting: one line naming the field; a sweep records the job as failed and goes on,
    a single run exits 2 and leaves no run folder (nothing ran)."""
    from dilexp.telemetry.record import RunRecord

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exc()
    _say(f"dilexp: config error: {e}")
    own_launch = os.environ.get(SWEEP_JOB_ENV) == "1"  # a multi-process sweep job, run as its own launch
    if ctx.multirun or own_launch:
        try:
            values = resolved(cfg)
        except Exception:  # a value that cannot be resolved (a bad environment variable) is the error itself
            values = {}
        RunRecord(ctx.run_dir, str(cfg.task.get("name")), ctx.choices, ctx.overrides, values).finish(
            "failed", error=f"ConfigError: {e}")
        if ctx.multirun:
            return None
        sys.exit(2)
    shutil.rmtree(ctx.run_dir, ignore_errors=True)
    sys.exit(2)


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    from dilexp.cache import reset_global_cache
    from dilexp.telemetry.record import NoRecord, RunRecord
    from dilexp.telemetry.wandb_logger import finish_wandb

    # Also where main() did not run: a submitit / SLURM worker calls this job function directly.
    signals.install()
    ctx = JobContext.from_hydra()
    if ctx.multirun:
        from dilexp.sweep import note_job_start

        note_job_start(ctx.run_dir)
    if ctx.multirun and cfg.get("resume"):
        from dilexp.sweep import kept_result

        # +resume=true: a job completed earlier with the same overrides is not run again.
        kept = kept_result(ctx.run_dir, ctx.sweep_dir, ctx.overrides)
        if kept is not None:
            _say(f"dilexp: kept (completed earlier): {ctx.run_dir}")
            return kept
    try:
        # The typed schema (dilexp/config) before anything reads a value (a job kept by resume is not
        # checked: a value added on the resume command is for the jobs that run again). Then the
        # memory estimate (dilexp/preflight.py): a job that cannot fit is refused before it starts.
        check_config(cfg)
        preflight(cfg)
    except ConfigError as e:
        return _config_failed(cfg, ctx, e)
    if ctx.multirun and is_multiprocess(cfg):
        return _run_as_own_launch(ctx)
    child_rank = is_launched_rank()
    # Jobs of a multirun share this process: process-wide caches must not carry counts over.
    reset_global_cache()
    ctx.choices.setdefault("logger", ",".join(sorted(cfg.get("logger") or {})) or "none")
    try:
        prepared = _prepare(cfg)
    except ConfigError as e:
        return _config_failed(cfg, ctx, e)
    except signals.Interrupted as e:
        if ctx.multirun and not child_rank:
            RunRecord(ctx.run_dir, str(cfg.task.name), ctx.choices, ctx.overrides, resolved(cfg)).finish(
                "interrupted", error=str(e), interrupted={"signal": signals.signal_name(e.signum), "step": None})
        from dilexp.sweep import runs_here

        if ctx.multirun and not runs_here(ctx.sweep_dir):
            return None  # a job in its own process (SLURM): as below
        raise
    except Exception as e:
        # Building can fail in ways no check foresees (an OOM while allocating the model):
        # in a sweep that is this job's result, and the other jobs still run.
        if not ctx.multirun or child_rank:
            raise
        RunRecord(ctx.run_dir, str(cfg.task.name), ctx.choices, ctx.overrides, resolved(cfg)).finish(
            "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20))
        _say(f"dilexp: job failed while building ({type(e).__name__}: {e}); record in {ctx.run_dir}")
        return None

    # Only the launching rank keeps the record; the extra ranks share its folder.
    record = NoRecord() if child_rank else RunRecord(ctx.run_dir, str(cfg.task.name), ctx.choices, ctx.overrides,
                                                     resolved(cfg))
    try:
        result = _run(cfg, ctx, prepared, record)
    except BaseException as e:
        if signals.received() is not None or isinstance(e, (signals.Interrupted, KeyboardInterrupt)):
            stop = _interrupted(ctx, str(cfg.task.name), record, e, child_rank)
            from dilexp.sweep import runs_here

            if ctx.multirun and not runs_here(ctx.sweep_dir):
                # A job in its own process (submitit, SLURM): recorded as interrupted, Hydra's job
                # end updates sweep.json, and `+resume=true` (or a requeue) continues it.
                return None
            raise stop from None
        if not isinstance(e, Exception):
            raise
        record.finish("failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=20))
        finish_wandb()
        _say(f"dilexp: job failed ({type(e).__name__}: {e}); record in {ctx.run_dir}")
        if ctx.multirun and not isinstance(e, KeyboardInterrupt):
            return None
        raise
    # task=check: a failed certificate is a completed job with a verdict (check/passed = 0 in
    # its record, so a sweep goes on and compare reads it), and a non-zero exit for a single run.
    exit_code = int(result.pop("exit_code", 0))
    record.finish("completed", **result)
    finish_wandb()
    if not child_rank:
        _say(f"dilexp: run folder: {ctx.run_dir}")
    if exit_code and not ctx.multirun:
        sys.exit(exit_code)
    return result


def _interrupted(ctx: JobContext, task: str, record: Any, e: BaseException, child_rank: bool
                 ) -> signals.Interrupted:
    """Record a job stopped by a signal as ``interrupted`` (signal, step, checkpoint); the stop to raise."""
    from dilexp.resume import LAST, checkpoint_dir
    from dilexp.telemetry.wandb_logger import finish_wandb

    if isinstance(e, signals.Interrupted):
        stop = e
    else:
        # Lightning's own ways out (KeyboardInterrupt, its SIGTERMException) after our handler ran.
        signum = signals.received() or int(signal.SIGINT)
        stop = signals.Interrupted(signum, signals.last_step())
    ckpt = checkpoint_dir(ctx.run_dir) / LAST
    info = {"signal": signals.signal_name(stop.signum), "step": stop.step,
            "checkpoint": str(ckpt) if ckpt.is_file() else None}
    record.finish("interrupted", error=str(stop), interrupted=info)
    finish_wandb()
    if not child_rank:
        where = f"; checkpoint {ckpt} (step {_ckpt_step(ckpt)})" if ckpt.is_file() else ""
        _say(f"dilexp: job {stop}{where}; record in {ctx.run_dir}")
        if task == "train" and not ctx.multirun and os.environ.get(SWEEP_JOB_ENV) != "1":
            again = " ".join(o for o in ctx.overrides if not o.startswith(("task.resume=", "+task.resume=")))
            _say(f"dilexp: resume: python -m dilexp {again} hydra.run.dir={ctx.run_dir} task.resume=auto".replace(
                "  ", " "))
    return stop


def _ckpt_step(path: Any) -> Any:
    try:
        from dilexp.resume import checkpoint_step

        return checkpoint_step(path)
    except Exception:  # noqa: BLE001 - the step is a courtesy in a message
        return "?"


def check_output_folder(argv: list[str]) -> None:
    """Exit 2 with one line when the run/sweep folder cannot be written (before Hydra makes it).

    Hydra creates the folder before any dilexp code runs, and a read-only place gives its
    chained traceback; a probe file in the nearest existing parent says it in one line.
    """
    import tempfile

    if any(a in ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg", "--resolve", "-p", "--package")
           or a.startswith(("--cfg", "--info", "--shell-completion", "-sc")) for a in argv):
        return
    given = {k.lstrip("+"): v for k, _, v in (a.partition("=") for a in argv)
             if k.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir")}
    targets = given or {"hydra.run.dir": "outputs"}
    for key, value in targets.items():
        path = os.path.abspath(os.path.expanduser(value.split("${", 1)[0] or "."))
        parent = path
        while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        try:
            fd, probe = tempfile.mkstemp(prefix=".dilexp-probe-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            _say(f"dilexp: {key}={value}: cannot write there ({parent}: {e.strerror or e}); "
                 f"set {key} to a writable folder")
            sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from dilexp.console import quiet_console
    from dilexp.sweep import objective

    quiet_console()
    # A sweeper that optimises (hparams_search=...) reads `optimized_metric` from the return value.
    return objective(cfg, run_job(cfg))


def _one_line_composition_errors() -> None:
    """Hydra's own composition errors (a key the config lacks, an unknown option, a bad override)
    as one `dilexp: config error:` line and exit 2, like every other bad setting.

    Hydra prints them over several lines and exits 1 from its private ``run_and_report``; this
    wraps that function (kept as is when a Hydra version lacks it). HYDRA_FULL_ERROR=1 still
    gives Hydra's full report.
    """
    try:
        from hydra._internal import utils as hydra_utils
        from hydra.errors import ConfigCompositionException, OverrideParseException
    except ImportError:  # pragma: no cover - another Hydra layout: its own report stays
        return
    original = getattr(hydra_utils, "run_and_report", None)
    if original is None or getattr(original, "dilexp_wrapped", False):
        return

    def run_and_report(func: Any) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                # The search path Hydra appends to a missing option says nothing about the fix.
                detail = str(e).split("Config search path:")[0].strip()
                detail += f" ({e.__cause__})" if e.__cause__ is not None else ""
                _say(f"dilexp: config error: {' '.join(detail.split())}")
                sys.exit(2)

        return original(guarded)

    run_and_report.dilexp_wrapped = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report


def main() -> None:
    _one_line_composition_errors()
    check_output_folder(sys.argv[1:])
    # SIGTERM / SIGINT / SIGUSR1 end a job (or a sweep) as interrupted, exit 128 + signal.
    signals.install()
    try:
        _hydra_main()
    except signals.Interrupted as e:
        from dilexp.sweep import finish_interrupted_sweep

        finish_interrupted_sweep(e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
