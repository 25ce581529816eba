"""experiments/gpu/run.sh (issue 17): its dry run end to end, and the goal arithmetic of collect.py."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu" / "run.sh"


def _collect_module():
    spec = importlib.util.spec_from_file_location("gpu_collect", ROOT / "experiments" / "gpu" / "collect.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(work: Path, sweep: str, rows: list[dict[str, object]]) -> None:
    path = work / sweep / "0" / "bench.csv"
    path.parent.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _att(variant: str, n: int, ms: float, tflops: float, peak: float, **kw: object) -> dict[str, object]:
    return {"target": "attention", "role": "main", "variant": variant, "head_dim": 64, "mode": "fwd_bwd",
            "seq_len": n, "status": "ok", "median_ms": ms, "tflops": tflops, "peak_alloc_mb": peak, **kw}


@pytest.mark.parametrize("dry_run", [False, True])
def test_collect_judges_the_goals_from_the_rows(tmp_path: Path, dry_run: bool) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    _write(work, "sdpa_segment", [_att("sdpa", 2048, 1.0, 400.0, 10)])
    _write(work, "sdpa_full", [_att("sdpa", 8192, 4.0, 350.0, 50)])
    _write(work, "dilated_improved", [_att("improved", 8192, 2.0, 300.0, 40)])  # 75% of 400: holds
    _write(work, "flex", [_att("flex", 8192, 3.0, 200.0, 40)])  # 50%: below 60%
    _write(work, "ring_v3", [_att("ring_v3", 8192, 2.4, 250.0, 20)])  # 1.2x improved, lower peak
    (out / "pytest.txt").write_text(
        "PASSED tests/test_gpu_paths.py::test_bf16_error_within_twice_dense_bf16[improved]\n"
        "FAILED tests/test_gpu_paths.py::test_bf16_error_within_twice_dense_bf16[flex] - assert\n")
    args = [str(work), str(out), "--seg-len", "2048"] + (["--dry-run"] if dry_run else [])
    mod = _collect_module()
    old = sys.argv
    try:
        sys.argv = ["collect.py", *args]
        assert mod.main() == 0
    finally:
        sys.argv = old
    goals = {line.split("|")[1].strip(): line.split("|")[3].strip()
             for line in (out / "goals.md").read_text().splitlines() if line.startswith("| ") and "goal" not in line}
    verdicts = list(goals.values())
    if dry_run:
        assert all(v.startswith("not yet measured") for v in verdicts), goals
    else:
        assert verdicts == ["holds", "does not hold", "holds", "not yet measured", "does not hold"], goals
    table = (out / "attention.md").read_text()
    assert "| improved | 64 | fwd_bwd | 8192 | ok | 2.00 | 300 | 75.0 | 2.00 | 40 |" in table


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_tables(tmp_path: Path) -> None:
    """The GPU script on CPU at tiny sizes: it must not rot while no GPU is lent."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["attention.md", "bench_rows.csv", "env.txt", "goals.md", "model.md", "pairs.md",
                     "pytest.txt", "run.log"]
    log = (out / "run.log").read_text()
    assert " exit 0" in log and "exit 1" not in log and "exit 124" not in log, log
    with (out / "bench_rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    ok = {(r["sweep"], r["variant"], r["mode"]) for r in rows if r["status"] == "ok" and r["role"] != "reference"}
    for sweep, variant in [("sdpa_full", "sdpa"), ("sdpa_segment", "sdpa"), ("dilated_improved", "improved"),
                           ("dilated_improved", "dilated"), ("ring_v3", "ring_v3")]:
        for mode in ("fwd", "fwd_bwd"):
            assert (sweep, variant, mode) in ok, (sweep, variant, mode)
    assert ("flex", "flex", "fwd") in ok  # flex has no backward on CPU
    assert {("model", "improved", "fwd_bwd"), ("model", "sdpa", "fwd_bwd")} <= ok
    roles = {(r["sweep"], r["role"]) for r in rows if r["status"] == "ok"}
    assert {("cache_pair", "compare_cache"), ("memory_pair", "compare_memory")} <= roles
    goals = (out / "goals.md").read_text()
    assert goals.count("not yet measured (dry run)") == 5
