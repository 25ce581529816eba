"""task=bench: time an attention variant, a model step or the pattern cache (DESIGN section 8).

    python -m dilexp task=bench attention=improved bench.seq_lens=[4096,8192,16384] bench.mode=fwd_bwd

Targets (``bench.target``):
- ``attention``: one layer on q, k, v of (bench.batch, N, bench.heads, bench.head_dim).
- ``model``: one LM training step (forward, loss, backward, AdamW step) of the configured
  model on synthetic tokens; ``mode=fwd`` is a forward + loss under no_grad.
- ``cache``: ``get_or_build`` of the configured cache strategy on a realistic key and
  pattern (the first branch of the attention's pattern at each N): a hit (served on the
  CPU, so no device copy), a miss (fresh key: lookup + build + insert), the build alone,
  the bare call overhead of the timing loop, and on a GPU a hit served on the device.

For attention and model every case (one N) times the variant, full SDPA (``bench.baseline_sdpa``),
``bench.compare_to`` (another variant, same pattern settings), ``bench.compare_cache`` (the same
variant built again with another pattern-cache strategy) and ``bench.compare_memory`` (the same
variant with another buffer pool) interleaved round by round, after ``bench.warmup`` untimed rounds;
then each candidate runs once more, alone and untimed, for its peak memory
(``dilexp.bench.memory``). One row per candidate and case; OOM and other failures are
rows (status ``oom`` / ``error``), never the end of the run. Cache and pool counters in a
row cover the whole case, warm-up included; with a process-wide cache strategy (cpu,
gpu) the variant and the compared variant share one cache, and its counters cover both.

Rows name their figures as training does (``cache/hit_rate``, ``memory/pool_requests``;
``dilexp.metrics``) and their FLOPs by DESIGN section 8 (``flop_count``: ``kernel`` for the
attention target, ``model`` for the model target; ``dilexp.bench.flops``).

``peak_held_mb`` adds to a candidate's ``peak_alloc_mb`` what its pool and pattern caches held
idle when the memory call began: a reused buffer or a cached pattern makes no allocation
during the call, yet it is memory the candidate keeps, so a pool or cache is not credited
with memory it merely set aside earlier. The ``peak_vs_*`` ratios use it.

The pieces live in ``dilexp.bench``: settings (the ``bench:`` node), twins (the candidates'
configs), cases (timing and rows of one N), reference (the matmul), cache_bench (the cache
target), report (bench.csv, the table, metrics). This module builds them and runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dilexp.bench.cache_bench import cache_rows
from dilexp.bench.cases import attention_step, model_step, run_case  # noqa: F401  (the timed units)
from dilexp.bench.reference import matmul_reference
from dilexp.bench.report import BenchLoggers, case_prefix, print_table, row_metrics, summary_metrics, write_csv
from dilexp.bench.settings import read_settings
from dilexp.bench.twins import COMPARE_CACHE, COMPARE_MEMORY, Variant, plan_variants, with_attention, with_group
from dilexp.errors import ConfigError
from dilexp.tasks.components import apply_hardware, attention_parts, build_model, compute_device
from dilexp.tasks.context import JobContext
from dilexp.telemetry.loggers import make_loggers
from dilexp.telemetry.record import RunRecord

__all__ = ["PreparedBench", "run_bench", "read_settings", "with_attention", "with_group", "CSV_NAME"]
CSV_NAME = "bench.csv"


class PreparedBench:
    """Everything built and checked from the config before any timing."""

    def __init__(self, cfg: DictConfig) -> None:
        self.settings = read_settings(cfg)
        apply_hardware(cfg)
        self.device = compute_device(cfg)
        s = self.settings
        if s.dtype in (torch.float16,) and self.device.type == "cpu" and s.target == "model":
            raise ConfigError("bench.dtype", s.dtype_name, "float16 autocast needs a GPU; use bfloat16 on a CPU")
        self.variants = [self._build(role, name, vcfg, cfg) for role, name, vcfg in plan_variants(cfg, s)]
        self.cache_strategy = str(cfg.cache.get("strategy", "none"))
        self.cache_settings = {k: v for k, v in (OmegaConf.to_container(cfg.cache, resolve=True) or {}).items()  # type: ignore[union-attr]
                               if k != "strategy"}

    def _build(self, role: str, name: str, vcfg: DictConfig, cfg: DictConfig) -> Variant:
        """One candidate on the device; a ConfigError of a twin names the bench field that asked for it."""
        s = self.settings
        kinds = {"cache_strategy": str(vcfg.cache.get("strategy", "none")),
                 "memory_kind": str(vcfg.memory.get("kind", "none"))}
        try:
            if s.target == "model":
                # The same seed for every variant: identical weights, only the attention differs.
                torch.manual_seed(int(cfg.get("seed", 0)))
                model, parts = build_model(vcfg, s.vocab_size)
                model.to(self.device)
                return Variant(role, name, parts.caches, parts.pool, model=model, **kinds)
            parts = attention_parts(vcfg, s.heads, s.head_dim)
            attn = parts.make().to(self.device)
            return Variant(role, name, parts.caches, parts.pool, attn=attn, **kinds)
        except ConfigError as e:
            if role == "compare" and e.field.startswith("attention."):
                reason = f"cannot take the settings of attention={cfg.attention.name}: {e}"
                raise ConfigError("bench.compare_to", name, reason) from e
            # E.g. memory=torch without CUDA: the user typed bench.compare_memory, not memory=.
            if role == COMPARE_CACHE and e.field.startswith("cache."):
                raise ConfigError("bench.compare_cache", s.compare_cache, str(e)) from e
            if role == COMPARE_MEMORY and e.field.startswith("memory."):
                raise ConfigError("bench.compare_memory", s.compare_memory, str(e)) from e
            if s.target != "model" and e.field in ("model.n_head", "model.head_dim"):
                field_name = "bench.heads" if e.field == "model.n_head" else "bench.head_dim"
                raise ConfigError(field_name, e.value, e.reason) from e
            raise

    @property
    def main(self) -> Variant:
        return self.variants[0]


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # No auto-refresh: its thread would take the GIL 10 times a second, inside timed calls.
    return Progress(TextColumn("[bold]bench[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), auto_refresh=False)


def _step_rows(p: PreparedBench, kind: str, n: int, matmul_tflops: float | None) -> list[dict[str, Any]]:
    s = p.settings
    if kind == "matmul":
        return [matmul_reference(s, p.device)]
    if s.target == "cache":
        return cache_rows(s, p.device, p.main.attn, p.cache_strategy, p.cache_settings, n)
    return run_case(s, p.device, p.variants, n, matmul_tflops)


def run_bench(cfg: DictConfig, ctx: JobContext, prepared: PreparedBench, record: RunRecord) -> dict[str, Any]:
    p, s = prepared, prepared.settings
    loggers = BenchLoggers.of(make_loggers(cfg, ctx, record))
    rows: list[dict[str, Any]] = []
    csv_path = Path(ctx.run_dir) / CSV_NAME
    steps = [("matmul", 0)] if s.matmul_reference and s.target != "cache" else []
    steps += [("case", n) for n in s.seq_lens]
    matmul_tflops: float | None = None

    with _progress() as progress:
        task = progress.add_task("", total=len(steps))
        for step, (kind, n) in enumerate(steps):
            label = f"matmul {s.matmul_size}" if kind == "matmul" else f"{s.target} N={n}"
            progress.update(task, description=label, refresh=True)
            new = _step_rows(p, kind, n, matmul_tflops)
            if kind == "matmul":
                matmul_tflops = new[0].get("tflops")
            rows.extend(new)
            # Written after every case: a run killed half-way still leaves what it measured.
            write_csv(rows, csv_path)
            record.update(bench=rows)
            # One step per case, the same keys every case: W&B charts each figure against the case.
            metrics: dict[str, float] = {"bench/seq_len": float(n)}
            for r in new:
                metrics.update(row_metrics(r, prefix=case_prefix(r)))
            loggers.log_metrics(metrics, step=step)
            progress.advance(task)
            progress.refresh()

    title = f"task=bench target={s.target} mode={s.mode} attention={cfg.attention.name} cache={p.cache_strategy}"
    print_table(rows, title)
    metrics = summary_metrics(rows)
    if matmul_tflops:
        metrics["bench/matmul_gflops"] = matmul_tflops * 1e3
    loggers.log_table(rows)
    loggers.update_summary(metrics)
    loggers.finish()
    return {"metrics": metrics, "bench": rows, "bench_csv": CSV_NAME}
