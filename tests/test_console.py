"""The console of a bare `python -m dilexp`: dilexp's own lines first, no other package's
chatter, W&B's sync command kept; and the filters name single warnings, not categories."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

METRIC_LINE = "step     1 |"


@pytest.mark.slow
def test_default_run_shows_at_most_four_lines_before_its_first_metric_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_QUIET", "WANDB_API_KEY")}
    # As a user runs it (offline W&B, CSV), only shorter: three steps.
    env.update({"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "80"})
    proc = subprocess.run([sys.executable, "-m", "dilexp", "task.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    out = proc.stdout  # both streams, in the order they were written (unbuffered)
    assert proc.returncode == 0, out[-3000:]
    lines = out.split("\n")
    first = next((i for i, line in enumerate(lines) if METRIC_LINE in line), None)
    assert first is not None, out[-3000:]
    # The progress bar redraws with carriage returns on the metric line's own line: not counted.
    before = [line for line in lines[:first] if line.strip()]
    assert len(before) <= 4, "\n".join(before)
    for noise in ("INFO:", "litlogger", "Previous log files", "is deprecated", "Trainer.fit` stopped",
                  "srun", "Run history", "Run summary", "anonymous setting"):
        assert noise not in out, (noise, out[-3000:])
    # The one W&B line that matters: how to upload the offline run.
    sync = [line for line in lines if "wandb sync" in line]
    assert len(sync) == 1 and str(tmp_path / "run" / "wandb" / "offline-run-") in sync[0], out[-2000:]


def test_filters_name_single_warnings_and_others_still_show() -> None:
    from dilexp.console import quiet_console

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_console()
        warnings.warn("The `srun` command is available on your system but is not used. HINT: ...", UserWarning,
                      stacklevel=1)
        warnings.warn("Experiment logs directory /x/ exists and is not empty. Previous log files ...", UserWarning,
                      stacklevel=1)
        warnings.warn("something that matters", UserWarning, stacklevel=1)
        warnings.warn("another deprecation", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something that matters", "another deprecation"]


def test_lightning_info_is_off_and_its_warnings_print_once() -> None:
    import logging

    from dilexp.console import quiet_console

    quiet_console()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert not rank_zero.isEnabledFor(logging.INFO)
    assert rank_zero.isEnabledFor(logging.WARNING)
