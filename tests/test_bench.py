"""task=bench: config, rows, FLOP counts, OOM/error rows, every target. No timing is asserted."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from dilexp.bench import cases as bench_cases
from dilexp.bench.flops import FWD_BWD_FACTOR, attention_flops, model_flops
from dilexp.bench.timing import Candidate, is_oom, run_interleaved, spread
from dilexp.cache import reset_global_cache
from dilexp.errors import ConfigError
from dilexp.tasks.bench import PreparedBench, read_settings, run_bench
from dilexp.tasks.context import JobContext
from dilexp.telemetry.record import RunRecord

# Small enough for a loaded 2-core CPU: every case takes milliseconds.
TINY = ["bench.seq_lens=[96,160]", "bench.repeats=2", "bench.warmup=1", "bench.heads=4", "bench.head_dim=16",
        "bench.matmul_size=64", "logger=none"]


def run_in_process(compose_cfg: Any, tmp_path: Path, overrides: list[str]) -> dict[str, Any]:
    cfg = compose_cfg(["task=bench", *TINY, *overrides])
    reset_global_cache()  # as run_job does: no counters carried over from other tests
    prepared = PreparedBench(cfg)
    record = RunRecord(tmp_path, "bench", {}, overrides, {})
    result = run_bench(cfg, JobContext(run_dir=tmp_path), prepared, record)
    record.finish("completed", **result)
    return result


def dense_allowed_pairs(n: int, num_heads: int, segment_lengths: list[int], dilation_rates: list[int],
                        causal: bool) -> int:
    """Pairs of the DESIGN section 3 pattern (offsets="head", heads="grouped"), from a dense mask
    built here position by position, independently of dilexp.patterns."""
    m = len(segment_lengths)
    base, extra = divmod(num_heads, m)
    sizes = [base + (1 if i < extra else 0) for i in range(m)]
    allowed = torch.zeros(num_heads, n, n, dtype=torch.bool)
    head = 0
    for i, size in enumerate(sizes):
        w, r = segment_lengths[i], dilation_rates[i]
        for h in range(head, head + size):
            o = h % r
            for s in range(0, n, w):
                sel = torch.tensor([p for p in range(s, min(s + w, n)) if (p - s) % r == o], dtype=torch.long)
                if len(sel):
                    allowed[h, sel[:, None], sel[None, :]] = True
        head += size
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    return int(allowed.sum())


# -- config ------------------------------------------------------------------------------------


def test_bench_composes_at_top_level_and_train_does_not_need_it(compose_cfg) -> None:
    cfg = compose_cfg(["task=bench", "bench.seq_lens=[1024,2048]", "bench.mode=fwd"])
    assert cfg.task.name == "bench"
    s = read_settings(cfg)
    assert s.seq_lens == (1024, 2048) and s.mode == "fwd" and s.target == "attention"
    default = compose_cfg(["task=bench"])
    assert list(default.bench.seq_lens) == [1024, 2048, 4096]
    assert default.bench.dtype == "float32" and default.bench.causal is True
    train = compose_cfg()
    assert train.task.name == "train" and "bench" not in train


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("bench.seq_lens=[]", "bench.seq_lens"),
        ("bench.seq_lens=[128,0]", "bench.seq_lens"),
        ("bench.repeats=0", "bench.repeats"),
        ("bench.warmup=-1", "bench.warmup"),
        ("bench.target=kernel", "bench.target"),
        ("bench.mode=bwd", "bench.mode"),
        ("bench.dtype=int8", "bench.dtype"),
        ("bench.compare_to=nosuchvariant", "bench.compare_to"),
        ("bench.compare_to=dilated", "bench.compare_to"),  # the benchmarked variant itself
        ("bench.compare_to=sdpa", "bench.compare_to"),  # already the baseline
        ("bench.heads=2", "bench.heads"),  # three segment lengths need three head groups
        ("bench.causal=maybe", "bench.causal"),
        ("bench.compare_cache=nosuch", "bench.compare_cache"),
        ("bench.compare_cache=local", "bench.compare_cache"),  # the run's own cache (the default)
        ("bench.compare_cache=[none]", "bench.compare_cache"),
        ("bench.compare_memory=nosuch", "bench.compare_memory"),
        ("bench.compare_memory=none", "bench.compare_memory"),  # the run's own pool (the default)
    ],
)
def test_bad_settings_name_their_field(compose_cfg, override: str, field: str) -> None:
    cfg = compose_cfg(["task=bench", "attention=dilated", override])
    with pytest.raises(ConfigError) as info:
        PreparedBench(cfg)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_compare_cache_and_memory_refuse_the_cache_target(compose_cfg) -> None:
    for override in ("bench.compare_cache=none", "bench.compare_memory=bucketed"):
        cfg = compose_cfg(["task=bench", "bench.target=cache", override])
        with pytest.raises(ConfigError) as info:
            PreparedBench(cfg)
        assert info.value.field == override.split("=")[0] and "target" in info.value.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="memory=torch is refused only without CUDA")
def test_compare_memory_torch_without_cuda_names_the_bench_field(compose_cfg) -> None:
    cfg = compose_cfg(["task=bench", "attention=improved", "bench.compare_memory=torch"])
    with pytest.raises(ConfigError) as info:
        PreparedBench(cfg)
    assert info.value.field == "bench.compare_memory" and "CUDA" in str(info.value)


# -- pieces ------------------------------------------------------------------------------------


def test_interleaving_is_round_robin_and_a_failure_stops_only_its_candidate() -> None:
    calls: list[str] = []

    def ok(name: str) -> Any:
        return lambda: calls.append(name)

    def boom() -> None:
        calls.append("C")
        if calls.count("C") == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    a, b, c = Candidate("A", ok("A")), Candidate("B", ok("B")), Candidate("C", boom)
    run_interleaved([a, b, c], warmup=1, repeats=3, device=torch.device("cpu"))
    assert calls == ["A", "B", "C", "A", "B", "C", "A", "B", "A", "B"]
    assert (a.status, b.status, c.status) == ("ok", "ok", "oom")
    assert len(a.times_s) == 3 and c.times_s == [] and "OutOfMemoryError" in (c.error or "")
    assert math.isnan(c.median_s)


def test_oom_detection() -> None:
    assert is_oom(torch.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))  # not an allocator error type


def test_spread_keeps_raw_times_and_orders_quantiles() -> None:
    st = spread([3.0, 1.0, 2.0, 10.0], "ms")
    assert st["median_ms"] == 2.5 and st["min_ms"] == 1.0 and st["max_ms"] == 10.0
    assert st["min_ms"] <= st["p25_ms"] <= st["median_ms"] <= st["p75_ms"] <= st["max_ms"]
    assert st["times_ms"] == [3.0, 1.0, 2.0, 10.0]
    one = spread([4.0], "ns")
    assert one["p25_ns"] == one["p75_ns"] == one["median_ns"] == 4.0


def test_flops_count_allowed_pairs_of_the_dense_mask() -> None:
    from dilexp.attention import build

    ws, rs = [64, 128, 256], [1, 2, 4]
    attn = build("dilated", num_heads=5, head_dim=16, segment_lengths=ws, dilation_rates=rs)
    for n, causal in ((300, True), (300, False), (200, True)):
        pairs = dense_allowed_pairs(n, 5, ws, rs, causal)
        assert attention_flops(attn, n, batch=2, causal=causal, mode="fwd") == 4 * 16 * pairs * 2
        assert attention_flops(attn, n, batch=2, causal=causal, mode="fwd_bwd") == FWD_BWD_FACTOR * 4 * 16 * pairs * 2
    full = build("sdpa", num_heads=3, head_dim=8)
    # Closed form for full attention: no (H, N, N) mask at bench lengths.
    n = 1 << 20
    assert attention_flops(full, n, batch=1, causal=True, mode="fwd") == 4 * 8 * 3 * n * (n + 1) / 2


def test_a_failing_logger_is_dropped_not_fatal(caplog) -> None:
    from dilexp.bench.report import BenchLoggers

    class Broken:
        def __getattr__(self, name: str) -> Any:
            def fail(*args: Any, **kwargs: Any) -> None:
                raise RuntimeError("W&B is down")

            return fail

    loggers = BenchLoggers(csv_logger=None, wandb_logger=Broken())
    loggers.log_metrics({"a": 1.0}, step=0)
    assert loggers.wandb is None  # dropped after its first failure, with a warning
    assert "W&B is down" in caplog.text
    loggers.log_table([{"variant": "x", "median_ms": 1.0}])
    loggers.update_summary({"a": 1.0})
    loggers.finish()


# -- runs --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_run_leaves_csv_summary_and_sdpa_ratio(dilexp_cli, tmp_path: Path) -> None:
    args = ["task=bench", "attention=dilated", "bench.seq_lens=[128,256]", "bench.repeats=2", "bench.warmup=1",
            "bench.heads=4", "bench.head_dim=16", "bench.matmul_size=128", "logger=csv"]
    proc = dilexp_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    assert len(runs) == 1
    run = runs[0]

    with (run / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    got = {(r["variant"], r["role"], int(r["seq_len"])) for r in rows}
    assert got == {("matmul", "reference", 128), ("dilated", "main", 128), ("sdpa", "sdpa", 128),
                   ("dilated", "main", 256), ("sdpa", "sdpa", 256)}
    for col in ("status", "median_ms", "p25_ms", "p75_ms", "min_ms", "times_ms", "flops", "tflops",
                "speedup_vs_sdpa", "peak_alloc_mb", "peak_alloc_source", "cache/hit_rate", "memory/pool_requests"):
        assert col in rows[0], col
    for r in rows:
        assert r["status"] == "ok", r
        times = json.loads(r["times_ms"])
        assert len(times) == 2 and float(r["min_ms"]) == pytest.approx(min(times), rel=1e-4)
    for r in rows:
        if r["target"] != "attention":
            continue
        n = int(r["seq_len"])
        if r["variant"] == "dilated":
            pairs = dense_allowed_pairs(n, 4, [64, 128, 256], [1, 2, 4], causal=True)
            assert float(r["speedup_vs_sdpa"]) > 0
            assert float(r["frac_of_matmul"]) > 0
        else:
            pairs = 4 * n * (n + 1) // 2
            assert float(r["speedup_vs_sdpa"]) == 1.0
        assert int(r["allowed_pairs"]) == pairs
        assert float(r["flops"]) == pytest.approx(FWD_BWD_FACTOR * 4 * 16 * pairs * 1)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["task"] == "bench"
    assert len(summary["bench"]) == 5
    assert summary["metrics"]["bench/cases_ok"] == 5.0
    assert "bench/attention/dilated/n256/speedup_vs_sdpa" in summary["metrics"]
    metrics_csv = (run / "metrics.csv").read_text().splitlines()
    assert "attention/dilated/median_ms" in metrics_csv[0] and len(metrics_csv) >= 3


@pytest.mark.slow
def test_cli_bad_bench_setting_exits_2(dilexp_cli, tmp_path: Path) -> None:
    proc = dilexp_cli(["task=bench", "bench.repeats=0", "logger=none"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "bench.repeats" in proc.stderr


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
                                 ValueError("kernel cannot take this shape")])
def test_failures_are_rows_and_the_run_goes_on(compose_cfg, tmp_path: Path, monkeypatch, exc: Exception) -> None:
    real = bench_cases.attention_step

    def failing(attn, *args, **kwargs):
        if attn.name == "dilated":
            raise exc
        return real(attn, *args, **kwargs)

    monkeypatch.setattr(bench_cases, "attention_step", failing)
    result = run_in_process(compose_cfg, tmp_path, ["attention=dilated", "bench.compare_to=improved"])
    rows = {(r["variant"], r["seq_len"]): r for r in result["bench"]}
    want = "oom" if isinstance(exc, torch.OutOfMemoryError) else "error"
    for n in (96, 160):
        assert rows[("dilated", n)]["status"] == want
        assert type(exc).__name__ in rows[("dilated", n)]["error"]
        assert "median_ms" not in rows[("dilated", n)]
        assert rows[("sdpa", n)]["status"] == "ok" and rows[("improved", n)]["status"] == "ok"
        assert rows[("improved", n)]["speedup_vs_sdpa"] > 0
    assert result["metrics"][f"bench/cases_{want}"] == 2.0
    with (tmp_path / "bench.csv").open() as f:
        assert sum(r["status"] == want for r in csv.DictReader(f)) == 2


def test_compare_to_gives_a_ratio_column(compose_cfg, tmp_path: Path) -> None:
    result = run_in_process(compose_cfg, tmp_path, ["attention=improved", "bench.compare_to=dilated",
                                                    "bench.mode=fwd", "bench.causal=false",
                                                    "bench.matmul_reference=false", "bench.memory_pass=false"])
    main = [r for r in result["bench"] if r["role"] == "main"]
    assert [r["seq_len"] for r in main] == [96, 160]
    for r in main:
        assert r["compare_to"] == "dilated" and r["speedup_vs_compare"] > 0
        assert r["mode"] == "fwd" and r["causal"] is False
    roles = sorted({r["role"] for r in result["bench"]})
    assert roles == ["compare", "main", "sdpa"]


@pytest.mark.parametrize("strategy", ["local", "cpu", "none"])
def test_cache_target(compose_cfg, tmp_path: Path, strategy: str) -> None:
    result = run_in_process(compose_cfg, tmp_path, ["bench.target=cache", f"cache={strategy}",
                                                    "bench.cache_calls=200", "bench.cache_miss_calls=20"])
    rows = result["bench"]
    assert {r["op"] for r in rows} == {"hit", "miss", "build", "call_overhead"}
    assert {r["seq_len"] for r in rows} == {96, 160}
    for r in rows:
        assert r["status"] == "ok" and r["variant"] == strategy
        assert r["per_call_ns"] > 0 and len(r["times_ns"]) == 2 and r["pattern_bytes"] > 0
    hit = next(r for r in rows if r["op"] == "hit")
    miss = next(r for r in rows if r["op"] == "miss")
    if strategy == "none":
        assert hit["cache/hits"] == 0
    else:
        # Every timed call of the hit batch is a hit; the miss batch never hits.
        assert hit["cache/hits"] >= 200 * 3 and miss["cache/hits"] == 0
    assert miss["cache/misses"] == 20 * 3


def test_model_target(compose_cfg, tmp_path: Path) -> None:
    from dilexp.tasks.train import train_flops_per_step

    cfg = compose_cfg(["task=bench", *TINY, "bench.target=model"])
    prepared = PreparedBench(cfg)
    model = prepared.main.model
    assert model is not None
    # Bench and train count a training step alike.
    assert model_flops(model, 160, 1, "fwd_bwd") == pytest.approx(train_flops_per_step(model, 160, 1))

    result = run_in_process(compose_cfg, tmp_path, ["bench.target=model", "bench.matmul_reference=false"])
    rows = result["bench"]
    assert {(r["variant"], r["seq_len"]) for r in rows} == {("dilated", 96), ("sdpa", 96), ("dilated", 160),
                                                             ("sdpa", 160)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["flops"] > 0 and r["heads"] == cfg.model.n_head
    assert (tmp_path / "bench.csv").exists()


def _pair_checks(rows: list[dict[str, Any]], seq_lens: tuple[int, ...]) -> None:
    by_role: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_role.setdefault(r["role"], []).append(r)
    for role in ("main", "compare_cache", "compare_memory"):
        assert [r["seq_len"] for r in by_role[role]] == list(seq_lens), role
        assert all(r["status"] == "ok" for r in by_role[role]), by_role[role]
    for r in by_role["main"]:
        assert (r["cache_strategy"], r["memory_kind"]) == ("local", "none")
        assert r["compare_cache"] == "none" and r["compare_memory"] == "bucketed"
        for tag in ("cache_none", "memory_bucketed"):
            assert r[f"speedup_vs_{tag}"] > 0
            assert r[f"peak_alloc_mb_{tag}"] >= 0 and r[f"peak_held_mb_{tag}"] >= 0
            assert r[f"peak_vs_{tag}"] > 0
        assert r["peak_held_mb"] >= r["peak_alloc_mb"]
        # The local cache keeps what it served (improved's plans are slice bounds: no tensor bytes).
        assert r["cache/entries"] > 0 and r["cache_held_mb"] >= 0
    for r in by_role["compare_cache"]:
        # Built again with cache=none: every lookup builds, nothing is kept.
        assert (r["cache_strategy"], r["memory_kind"]) == ("none", "none")
        assert r["cache/hits"] == 0 and r["cache/misses"] > 0 and r["cache_held_mb"] == 0
        assert "speedup_vs_cache_none" not in r
    for r in by_role["compare_memory"]:
        assert (r["cache_strategy"], r["memory_kind"]) == ("local", "bucketed")
        assert r["memory/pool_requests"] > 0 and "memory/pool_reuses" in r


def test_compare_cache_and_memory_pair_rows(compose_cfg, tmp_path: Path) -> None:
    result = run_in_process(compose_cfg, tmp_path, ["attention=improved", "bench.compare_cache=none",
                                                    "bench.compare_memory=bucketed", "bench.matmul_reference=false"])
    rows = result["bench"]
    assert sorted({r["role"] for r in rows}) == ["compare_cache", "compare_memory", "main", "sdpa"]
    _pair_checks(rows, (96, 160))
    # The twins have their own metric keys: the main row's figures are not overwritten.
    metrics = result["metrics"]
    assert "bench/attention/improved/n96/speedup_vs_cache_none" in metrics
    assert "bench/attention/improved+cache_none/n96/median_ms" in metrics
    assert "bench/attention/improved+memory_bucketed/n160/median_ms" in metrics
    main96 = next(r for r in rows if r["role"] == "main" and r["seq_len"] == 96)
    assert metrics["bench/attention/improved/n96/median_ms"] == main96["median_ms"]
    with (tmp_path / "bench.csv").open() as f:
        header = next(csv.reader(f))
    assert {"role", "cache_strategy", "speedup_vs_cache_none", "peak_vs_memory_bucketed"} <= set(header)


def test_compare_cache_and_memory_on_the_model_target(compose_cfg, tmp_path: Path) -> None:
    # improved: dilated takes no buffers from the pool, so its pool twin would show nothing.
    result = run_in_process(compose_cfg, tmp_path, ["bench.target=model", "attention=improved",
                                                    "bench.compare_cache=none", "bench.compare_memory=bucketed",
                                                    "bench.matmul_reference=false", "bench.baseline_sdpa=false",
                                                    "bench.seq_lens=[96]"])
    rows = result["bench"]
    assert sorted(r["role"] for r in rows) == ["compare_cache", "compare_memory", "main"]
    _pair_checks(rows, (96,))
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_compared_variant_gets_the_pattern_but_not_settings_it_cannot_take(compose_cfg) -> None:
    from dilexp.tasks.bench import with_attention

    cfg = compose_cfg(["task=bench", "attention=ring_v2", "attention.chunks=4", "attention.segment_lengths=[32,64]",
                       "attention.dilation_rates=[1,2]"])
    other = with_attention(cfg, "improved", keep_settings=True)
    assert other.attention.name == "improved"
    assert list(other.attention.segment_lengths) == [32, 64]
    assert "chunks" not in other.attention and "placement" not in other.attention


def test_a_twin_gets_its_option_from_the_yaml_not_the_class_defaults() -> None:
    """bench.compare_memory=bucketed must compare with the pool `memory=bucketed` builds."""
    from dilexp.tasks.bench import with_group

    cfg = OmegaConf.create({"memory": {"kind": "none"}, "cache": {"strategy": "none"}})
    mem = with_group(cfg, "memory", "kind", "bucketed").memory
    want = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "memory" / "bucketed.yaml")
    assert mem.kind == "bucketed" and mem.reclaim == want.reclaim and mem.exact == want.exact
    assert with_group(cfg, "cache", "strategy", "cpu").cache.strategy == "cpu"
    assert cfg.memory.kind == "none"  # the main config is left alone


def test_the_sdpa_baseline_of_a_pooled_run_takes_no_pool(compose_cfg) -> None:
    """sdpa refuses a pool it cannot use; the bench's baseline of a memory=bucketed run gets none."""
    cfg = compose_cfg(["task=bench", *TINY, "attention=dilated", "memory=bucketed"])
    prepared = PreparedBench(cfg)
    kinds = {v.role: v.memory_kind for v in prepared.variants}
    assert kinds == {"main": "bucketed", "sdpa": "none"}
