"""dilexp.compare on run records written here: grouping, varying columns, ratios with bootstrap
intervals, broken runs, md/csv/png output, and the W&B guard. (The real sweep: test_sweep.py.)"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from dilexp.compare import bootstrap_ratio, find_runs, main, make_tables


def _summary(folder: Path, status: str = "completed", task: str = "train", choices: dict[str, str] | None = None,
             overrides: list[str] | None = None, metrics: dict[str, Any] | None = None,
             bench: list[dict[str, Any]] | None = None, **extra: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"status": status, "task": task, "choices": choices or {}, "overrides": overrides or [],
                            "metrics": metrics or {}, **extra}
    if bench is not None:
        data["bench"] = bench
    (folder / "summary.json").write_text(json.dumps(data))
    return folder


def _train(root: Path, name: str, attention: str, seq_len: int, step_ms: float, seed: int = 1,
           status: str = "completed", **extra: Any) -> Path:
    metrics = {"perf/step_ms_median": step_ms, "val/loss": 3.0, "cache/hit_rate": 0.5,
               "memory/peak_rss_mb": 400.0} if status == "completed" else {}
    return _summary(root / name, status=status,
                    choices={"attention": attention, "cache": "local", "task": "train"},
                    overrides=[f"attention={attention}", f"data.seq_len={seq_len}", f"seed={seed}",
                               "task.max_steps=10"],
                    metrics=metrics, **extra)


def _bench_row(variant: str, n: int, times: list[float], status: str = "ok", role: str = "main") -> dict[str, Any]:
    row: dict[str, Any] = {"target": "attention", "variant": variant, "role": role, "seq_len": n, "batch": 1,
                           "heads": 8, "head_dim": 64, "dtype": "float32", "mode": "fwd_bwd", "causal": True,
                           "status": status}
    if status == "ok":
        times = sorted(times)
        row.update(median_ms=times[len(times) // 2], times_ms=times, tflops=1.0 / times[len(times) // 2])
    else:
        row["error"] = "CUDA out of memory"
    return row


def _sweep_of_seeds(root: Path) -> Path:
    # sdpa vs dilated at two lengths, three seeds each: repeats of six configurations.
    for i, seed in enumerate((1, 2, 3)):
        _train(root, f"a{i}", "sdpa", 256, 100.0 + i, seed=seed)
        _train(root, f"b{i}", "sdpa", 1024, 400.0 + 2 * i, seed=seed)
        _train(root, f"c{i}", "dilated", 256, 99.0 + 3 * i, seed=seed)   # overlaps sdpa: no clear difference
        _train(root, f"d{i}", "dilated", 1024, 200.0 + i, seed=seed)     # clearly lower
    return root


def test_seeds_are_repeats_and_only_varying_settings_are_columns(tmp_path: Path) -> None:
    runs = find_runs([_sweep_of_seeds(tmp_path / "sweep")])
    assert len(runs) == 12
    (table,) = make_tables(runs, None)
    assert len(table.rows) == 4
    assert all(r.n == 3 for r in table.rows)
    # cache and task.max_steps are the same everywhere, the seed is a repeat: not columns.
    assert table.keys == ["attention", "data.seq_len"]
    assert table.metrics[0] == "perf/step_ms_median"
    assert "memory/peak_rss_mb" in table.metrics  # the CPU fallback of peak_allocated_mb|peak_rss_mb


def test_baseline_ratio_with_bootstrap_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep_of_seeds(tmp_path / "sweep")
    out = tmp_path / "cmp.csv"
    assert main([str(sweep), "--baseline", "attention=sdpa", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4
    by = {(r["attention"], r["data.seq_len"]): r for r in rows}
    assert by[("sdpa", "256")]["note"] == "baseline"
    short = by[("dilated", "256")]
    assert float(short["ci_low"]) <= 1.0 <= float(short["ci_high"])
    assert short["note"] == "no clear difference"
    long = by[("dilated", "1024")]
    assert float(long["ratio"]) == pytest.approx(201.0 / 402.0)
    assert float(long["ci_high"]) < 1.0 and long["note"] == "lower"


def test_bootstrap_needs_repeats_on_both_sides() -> None:
    assert bootstrap_ratio([1.0], [1.0, 2.0]) is None
    lo, hi = bootstrap_ratio([1.0, 1.1, 0.9, 1.0], [2.0, 2.1, 1.9, 2.0])
    assert 0.4 < lo <= 0.5 <= hi < 0.6


def test_bench_cases_ratio_from_raw_timings_and_failed_rows(tmp_path: Path) -> None:
    sweep = tmp_path / "bench"
    for i, attention in enumerate(("dilated", "improved")):
        factor = 1.0 if attention == "dilated" else 0.5
        rows = [_bench_row(attention, 1024, [10 * factor, 11 * factor, 10.5 * factor, 9.8 * factor, 10.2 * factor]),
                _bench_row("sdpa", 1024, [20, 21, 19, 20, 20], role="sdpa"),
                _bench_row(attention, 16384, [160 * factor, 170 * factor, 150 * factor, 155 * factor, 158 * factor]),
                _bench_row(attention, 65536, [], status="oom")]
        _summary(sweep / str(i), task="bench", choices={"attention": attention, "task": "bench"},
                 overrides=[f"attention={attention}", "task=bench"], bench=rows,
                 metrics={"bench/cases_ok": 3.0, "bench/cases_oom": 1.0})
    md = tmp_path / "bench.md"
    png = tmp_path / "bench.png"
    assert main([str(sweep), "--baseline", "attention=dilated", "--out", str(md), "--plot", str(png),
                 "--x", "seq_len", "--y", "median_ms"]) == 0
    text = md.read_text()
    # role=main rows only: 3 cases x 2 variants; the bench's own `variant` repeats `attention`.
    body = [line for line in text.splitlines() if line.startswith("| ") and "status" not in line]
    assert len(body) == 6, text
    assert "| variant |" not in text.splitlines()[4]
    oom = [line for line in body if line.startswith("| oom")]
    assert len(oom) == 2 and all("out of memory" in line for line in oom)
    improved = [line for line in body if "improved" in line and "completed" in line]
    assert all("| 0.5 |" in line and "lower" in line for line in improved), improved

    tables = make_tables(find_runs([sweep]), None)
    from dilexp.compare import plot

    info = plot(tables, tmp_path / "again.png", "seq_len", "median_ms")
    assert info.xscale == "log" and info.yscale == "log"  # 1024..16384, 5..170 ms: both span a decade
    assert info.lines == ["attention=dilated", "attention=improved"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_broken_and_unfinished_runs_are_rows_not_crashes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    _train(sweep, "0", "sdpa", 256, 100.0)
    _train(sweep, "1", "dilated", 256, 50.0, status="failed", error="RuntimeError: boom")
    _train(sweep, "2", "improved", 256, 0.0, status="running")
    (sweep / "3").mkdir()
    (sweep / "3" / "summary.json").write_text('{"status": "compl')  # torn write
    (sweep / "4" / ".hydra").mkdir(parents=True)
    (sweep / "4" / ".hydra" / "overrides.yaml").write_text("- attention=flex\n")  # killed before its record
    _summary(sweep / "5", metrics={"perf/step_ms_median": "inf"}, choices={"attention": "ring_v2"},
             overrides=["attention=ring_v2"])
    # A bench job killed after its first case: that case was timed, the job is not done.
    _summary(sweep / "6", status="running", task="bench", choices={"attention": "ring_v3"},
             overrides=["attention=ring_v3", "task=bench"], bench=[_bench_row("ring_v3", 1024, [5.0, 6.0, 7.0])])
    assert main([str(sweep), "--baseline", "attention=sdpa", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    status = {(r["table"], r["attention"]): r["status"] for r in rows}
    assert status == {("train", "sdpa"): "completed", ("train", "dilated"): "failed", ("train", "improved"): "running",
                      ("train", ""): "corrupt", ("train", "flex"): "no record", ("train", "ring_v2"): "completed",
                      ("bench", ""): "partial (running)"}  # a table of one row: no column varies
    assert next(r for r in rows if r["table"] == "bench")["median_ms"] == "6.0"
    failed = next(r for r in rows if r["attention"] == "dilated")
    assert failed["perf/step_ms_median"] == "" and failed["error"] == "RuntimeError: boom"
    # The terminal table too.
    assert main([str(sweep), "--width", "200"]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "corrupt" in out and "no record" in out


def test_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs found" in capsys.readouterr().err
    _train(tmp_path / "one", "0", "sdpa", 256, 10.0)
    assert main([str(tmp_path / "one"), "--plot", str(tmp_path / "p.png"), "--x", "nope"]) == 2
    assert "--plot" in capsys.readouterr().err


def test_wandb_source_refuses_offline_with_a_way_out(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["--wandb", "team/dilexp", "--group", "sweep-x"]) == 2
    err = capsys.readouterr().err
    assert "WANDB_MODE=offline" in err and "wandb sync" in err and "dilexp.compare outputs/" in err


class _FakeRun:
    def __init__(self, i: int, attention: str, seq_len: int, step_ms: float, state: str = "finished") -> None:
        self.entity, self.project, self.id, self.name, self.state = "team", "dilexp", f"r{i}", f"{i}-x", state
        self.tags = [f"attention={attention}", "cache=local", "task=train"]
        self.config = {"task": {"name": "train", "max_steps": 10}, "data": {"seq_len": seq_len},
                       "attention": {"name": attention, "segment_lengths": [64] if attention != "sdpa" else None},
                       "seed": i, "logger": {"csv": {}}}
        self.summary_metrics = {"perf/step_ms_median": step_ms, "val/loss": 3.0, "_runtime": 12, "note": "x"}


def test_wandb_runs_become_rows(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import wandb

    asked: dict[str, Any] = {}

    class FakeApi:
        def __init__(self, timeout: int = 0) -> None:
            pass

        def runs(self, path: str, filters: dict[str, Any] | None = None) -> list[_FakeRun]:
            asked.update(path=path, filters=filters)
            return [_FakeRun(0, "sdpa", 256, 100.0), _FakeRun(1, "dilated", 256, 50.0),
                    _FakeRun(2, "sdpa", 1024, 400.0), _FakeRun(3, "dilated", 1024, 100.0, state="crashed")]

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "Api", FakeApi)
    args = ["--wandb", "team/dilexp", "--group", "sweep-x", "--baseline", "attention=sdpa", "--format", "csv"]
    assert main(args) == 0
    assert asked == {"path": "team/dilexp", "filters": {"group": "sweep-x"}}
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    # data.seq_len comes from the config (it is no tag); attention.* is explained by the choice.
    assert [(r["attention"], r["data.seq_len"], r["status"]) for r in rows] == [
        ("dilated", "256", "completed"), ("dilated", "1024", "failed"), ("sdpa", "256", "completed"),
        ("sdpa", "1024", "completed")]
    assert float(rows[0]["ratio"]) == pytest.approx(0.5)


def test_globbed_metrics_come_in_numeric_order() -> None:
    from dilexp.compare import _natural_key

    keys = ["val/acc_dist/128-255", "val/acc_dist/16-31", "val/acc_dist/2-3", "val/acc_dist/8-15"]
    assert sorted(keys, key=_natural_key) == [
        "val/acc_dist/2-3", "val/acc_dist/8-15", "val/acc_dist/16-31", "val/acc_dist/128-255"]
