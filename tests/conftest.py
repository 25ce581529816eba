"""Shared fixtures: the config dir, a Hydra compose helper, and a subprocess runner for `python -m dilexp`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from dilexp.main import CONF_DIR

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For modules of tiny tensors: a second OpenMP thread only spins, and on a shared
    2-core machine it multiplies the suite's time."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_cfg() -> Iterator:
    def _compose(overrides: list[str] | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [])

    yield _compose
    GlobalHydra.instance().clear()


def run_dilexp(args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None,
               module: str = "dilexp") -> subprocess.CompletedProcess:
    """Run `python -m dilexp ARGS` in ``cwd`` the way a user would, offline W&B, 1 thread."""
    e = dict(os.environ)
    e.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
              "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    e.pop("WANDB_API_KEY", None)
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def dilexp_cli():
    return run_dilexp


@pytest.fixture
def gloo_group(tmp_path: Path):
    """Run ``worker(rank, world, store, out_dir, *extra)`` in ``world`` spawned processes and return
    each rank's ``rank<r>.json`` (written by the worker into out_dir); a rank's error, or a group
    that outlives ``deadline_s``, fails the test."""
    import json
    import time

    import torch.multiprocessing as mp

    def run(worker, world: int, *extra: object, deadline_s: float) -> list[dict]:
        args = (world, str(tmp_path / "store"), str(tmp_path), *extra)
        ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    pytest.fail(f"{world}-process group did not finish in {deadline_s}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
        for r, res in enumerate(results):
            assert res["error"] is None, f"rank {r}:\n{res['error']}"
        return results

    return run
