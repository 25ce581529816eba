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


# -- 80 columns, one number format, plots that say what they can and cannot draw ----------------


def _bench_sweep(root: Path) -> Path:
    """Three bench jobs as `task=bench` writes them: each with its sdpa twin, the matmul
    reference and, for the variants with a pattern cache, hit counts (sdpa has no lookups)."""
    for i, attention in enumerate(("dilated", "improved", "sdpa")):
        rows = []
        for n, base in ((1024, 10.0), (16384, 160.0)):
            main_row = _bench_row(attention, n, [base * (i + 1) * f for f in (1.0, 1.1, 0.9, 1.05, 0.95)])
            hits = 0 if attention == "sdpa" else 99
            main_row.update(cache_hits=hits, cache_misses=0 if attention == "sdpa" else 1,
                            cache_hit_rate=0.0 if attention == "sdpa" else 0.99, peak_alloc_mb=1234.5 * (i + 1),
                            speedup_vs_sdpa=34567.0 / (i + 1))
            rows.append(main_row)
            rows.append(_bench_row("sdpa", n, [20.0 * n / 1024, 21.0 * n / 1024, 19.0 * n / 1024], role="sdpa"))
        matmul = {"target": "reference", "variant": "matmul", "role": "reference", "seq_len": 4096,
                  "dtype": "float32", "mode": "fwd", "status": "ok", "median_ms": 500.0 + i, "tflops": 0.27}
        _summary(root / "2026-12-04" / f"10-00-00-12345{i}-ab12" / str(i), task="bench",
                 choices={"attention": attention, "task": "bench"},
                 overrides=[f"attention={attention}", "task=bench"], bench=[*rows, matmul])
    return root


def test_number_format_is_three_significant_digits_with_thousands_separators() -> None:
    from dilexp.compare import _fmt

    assert [_fmt(v) for v in (34455.0, 3.416e4, 4e4, 1234567.0, 12.345, 0.5, 0.0523, 999.7, 0.0, -2.5)] == [
        "34,500", "34,200", "40,000", "1,230,000", "12.3", "0.5", "0.0523", "1,000", "0", "-2.5"]
    assert _fmt(0.000123) == "1.23e-04"  # below 0.001 an exponent, still 3 digits
    assert _fmt(None) == "-"


@pytest.mark.parametrize("extra", [[], ["--rows", "all"], ["--baseline", "attention=sdpa"],
                                   ["--metrics", "median_ms,tflops,speedup_vs_sdpa,peak_alloc_mb,cache_hit_rate,"
                                                 "cache_hits,cache_misses,status"]])
def test_bench_tables_fit_80_columns_without_breaking_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str],
                                                             extra: list[str]) -> None:
    sweep = _bench_sweep(tmp_path / "multirun")
    monkeypatch.setenv("COLUMNS", "80")  # the width of a pipe
    assert main([str(sweep), *extra]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), "\n".join(x for x in lines if len(x) > 80)
    words = out.split()
    # Whole numbers, settings and short paths: nothing cut across two lines.
    for token in ("34,600", "17,300", "dilated", "improved", "16384", "1,230", "2,470"):
        assert token in words, (token, out)
    assert str(tmp_path) not in out  # run folders shortened to the part that differs
    assert "10-00-00-123450-ab12/0" in words
    if not extra:
        # The cache hit column (the run column may come in a second part): sdpa has no lookups.
        hit = {line.split()[1] + line.split()[2]: line.split()[-1] for line in lines
               if line.startswith("completed") and "ab12" not in line}
        assert hit == {"dilated1024": "0.99", "dilated16384": "0.99", "improved1024": "0.99",
                       "improved16384": "0.99", "sdpa1024": "n/a", "sdpa16384": "n/a"}, out
    if extra[:2] == ["--rows", "all"]:
        assert "reference rows" in out  # the matmul in a table of its own, not among the cases


def test_train_table_at_80_columns_puts_errors_below(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep_of_seeds(tmp_path / "sweep")
    _train(sweep, "f", "improved", 256, 0.0, status="failed",
           error="RuntimeError: a long message " + "that goes on " * 12)
    monkeypatch.setenv("COLUMNS", "80")
    assert main([str(sweep), "--metrics", "perf/step_ms_median,val/loss,cache/hit_rate,memory/peak_rss_mb,"
                 "perf/tokens_per_s_median", "--baseline", "attention=sdpa"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert any(line.startswith("f: RuntimeError: a long message") for line in lines)


def test_categorical_x_draws_bars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dilexp.compare import plot

    sweep = _sweep_of_seeds(tmp_path / "sweep")
    png = tmp_path / "bars.png"
    assert main([str(sweep), "--plot", str(png), "--x", "attention", "--y", "perf/step_ms_median"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = plot(make_tables(find_runs([sweep]), None), tmp_path / "again.png", "attention", "step_ms_median")
    assert info.kind == "bars"
    # One bar per sequence length in each attention group; the labels name only what varies.
    assert info.lines == ["data.seq_len=256", "data.seq_len=1024"]


def test_rows_all_plot_keeps_the_matmul_off_the_n_axis(tmp_path: Path) -> None:
    from dilexp.compare import plot

    sweep = _bench_sweep(tmp_path / "multirun")
    tables = make_tables(find_runs([sweep]), None, bench_rows="all")
    info = plot(tables, tmp_path / "all.png", "seq_len", "median_ms")
    assert info.kind == "lines"
    assert info.references == ["matmul 4096x4096"]  # a level across the plot, one for the three jobs
    assert not any("matmul" in label or "reference" in label for label in info.lines)
    # Constant settings (heads, dtype, mode, ...) are in no label.
    assert all(not any(k in label for k in ("heads", "dtype", "mode", "target")) for label in info.lines)


def test_an_impossible_plot_says_why_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    _train(sweep, "0", "sdpa", 256, 10.0)
    _train(sweep, "1", "dilated", 256, 0.0, status="failed", error="boom")
    assert main([str(sweep), "--plot", str(tmp_path / "p.png"), "--x", "attention", "--y", "val/acc",
                 "--metrics", "val/acc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no row has a value of val/acc" in err, err
    assert not (tmp_path / "p.png").exists()
