"""One bench case (one N): the timed units, the candidates' inputs, and the rows they leave.

Every candidate at N runs round by round with the others (``dilexp.bench.timing``), then once
more alone for its peak memory (``dilexp.bench.memory``). One row per candidate; an OOM or
other failure is the row's status, never the end of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dilexp.attention import Attention
from dilexp.bench.documents import NODOCS, DocSteps, doc_columns, doc_layouts
from dilexp.bench.flops import KERNEL, MODEL, attention_flops, attention_pairs, dense_pairs, model_flops, model_pairs
from dilexp.bench.memory import measure_case_memory
from dilexp.bench.settings import BenchSettings
from dilexp.bench.stats import cache_columns, pair_columns, pool_columns, stats_delta
from dilexp.bench.timing import Candidate, free_memory, is_oom, run_interleaved, spread
from dilexp.bench.twins import COMPARE_CACHE, COMPARE_MEMORY, Variant
from dilexp.cache import pregenerate_patterns
from dilexp.metrics import CACHE_COUNTERS
from dilexp.models import GPT
from dilexp.patterns.documents import DocumentLayout

_MB = float(2**20)


def attention_step(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   grad_out: torch.Tensor | None, docs: DocumentLayout | None = None) -> Any:
    """The timed unit of the attention target: forward, or forward + backward to q, k, v.

    ``torch.autograd.grad`` rather than ``.backward()``: no ``.grad`` accumulation to
    clear between calls, and nothing kept alive after the call.
    """
    if grad_out is None:
        with torch.no_grad():
            return attn(q, k, v, causal=causal, docs=docs)
    out = attn(q, k, v, causal=causal, docs=docs)
    return torch.autograd.grad(out, (q, k, v), grad_out)


def model_step(model: GPT, optimizer: torch.optim.Optimizer | None, tokens: torch.Tensor,
               autocast_dtype: torch.dtype | None, docs: DocumentLayout | None = None) -> Any:
    """The timed unit of the model target: one training step (or a forward + loss when no optimizer)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    device_type = tokens.device.type
    if optimizer is None:
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            logits = model(inputs, docs=docs)
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(inputs, docs=docs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class Case:
    """One sequence length: the candidates, with how to rebuild their inputs."""

    n: int
    candidates: list[tuple[Variant, Candidate]] = field(default_factory=list)


def attention_case(s: BenchSettings, dev: torch.device, variants: list[Variant], n: int) -> tuple[Case, dict[str, Any]]:
    """The attention target's candidates at N, on inputs drawn for N (the same for every candidate)."""
    shape = (s.batch, n, s.heads, s.head_dim)
    grad = s.mode == "fwd_bwd"
    gen = torch.Generator(device="cpu").manual_seed(n)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float32).to(dev, s.dtype).requires_grad_(grad)
               for _ in range(3))
    g = torch.randn(shape, generator=gen, dtype=torch.float32).to(dev, s.dtype) if grad else None
    case = Case(n)
    ids = _doc_ids(s, n)
    for var in variants:
        assert var.attn is not None
        attn = var.attn

        # Looked up in the module at call time, so tests can replace attention_step.
        def fn(docs: DocumentLayout | None = None, attn: Attention = attn) -> Any:
            return attention_step(attn, q, k, v, s.causal, g, docs)

        case.candidates.append((var, Candidate(var.role, _unit(fn, var, ids))))
    return case, {"batch": s.batch, "heads": s.heads, "head_dim": s.head_dim, "causal": s.causal}


def model_case(s: BenchSettings, dev: torch.device, variants: list[Variant], n: int) -> tuple[Case, dict[str, Any]]:
    """The model target's candidates at N: one training step (or forward + loss) on the same tokens."""
    gen = torch.Generator(device="cpu").manual_seed(n)
    # n + 1 tokens: n inputs and their n next-token targets.
    tokens = torch.randint(0, s.vocab_size, (s.batch, n + 1), generator=gen).to(dev)
    autocast = None if s.dtype == torch.float32 else s.dtype
    case = Case(n)
    ids = _doc_ids(s, n)
    for var in variants:
        assert var.model is not None
        if s.mode == "fwd_bwd" and var.optimizer is None:
            var.optimizer = torch.optim.AdamW(var.model.parameters(), lr=1e-4)
        var.model.train(s.mode == "fwd_bwd")

        def fn(docs: DocumentLayout | None = None, model: GPT = var.model,
               opt: Any = var.optimizer if s.mode == "fwd_bwd" else None) -> Any:
            return model_step(model, opt, tokens, autocast, docs)

        case.candidates.append((var, Candidate(var.role, _unit(fn, var, ids))))
    m = variants[0].model
    assert m is not None
    return case, {"batch": s.batch, "heads": m.cfg.n_head, "head_dim": m.cfg.head_dim, "causal": True}


def _doc_ids(s: BenchSettings, n: int) -> list[torch.Tensor] | None:
    """bench.docs: one fresh layout per call of a candidate (warm-up, timed, memory pass)."""
    if s.docs is None:
        return None
    return doc_layouts(s.docs, s.batch, n, s.warmup + s.repeats + 2)


def _unit(fn: Any, var: Variant, ids: list[torch.Tensor] | None) -> Any:
    """The candidate's timed unit: ``fn`` as is, or over packed documents (the nodocs twin:
    the same tokens without them), timed by ``DocSteps``."""
    if ids is None:
        return fn
    return DocSteps(fn, None if var.role == NODOCS else ids)


def useful_flops(s: BenchSettings, var: Variant, n: int) -> tuple[float, float]:
    """(useful FLOPs, allowed pairs) of one call; NaN where a variant's pattern cannot be counted.

    The model target counts by the model convention, the attention target by the kernel
    convention (DESIGN section 8; ``flop_count`` of the row)."""
    if var.model is not None:
        count = model_pairs(var.model, n)
        return model_flops(var.model, n, s.batch, s.mode), math.nan if count is None else float(count)
    assert var.attn is not None
    count = attention_pairs(var.attn, n, s.causal)
    return attention_flops(var.attn, n, s.batch, s.causal, s.mode), math.nan if count is None else float(count)


def run_case(s: BenchSettings, dev: torch.device, variants: list[Variant], n: int,
             matmul_tflops: float | None) -> list[dict[str, Any]]:
    """All candidates at one N: pregenerate, interleaved timing, memory pass, rows."""
    base = {"target": s.target, "seq_len": n, "dtype": s.dtype_name, "mode": s.mode, "device": str(dev),
            "warmup": s.warmup, "repeats": s.repeats}
    make = model_case if s.target == "model" else attention_case
    # Each case starts with empty pools, as its peak figures start from zero: buffers
    # sized for the previous N would otherwise count as idle memory held here.
    for var in variants:
        var.pool.clear()
    try:
        for var in variants:
            # The model's attention is always causal; the layer's is bench.causal.
            pregenerate_patterns(var.modules(), n, dev, True if s.target == "model" else s.causal)
        case, shape = make(s, dev, variants, n)
    except Exception as e:  # noqa: BLE001 - e.g. the inputs themselves do not fit: every candidate fails alike
        status, msg = ("oom" if is_oom(e) else "error"), f"{type(e).__name__}: {e}"[:500]
        del e
        free_memory(dev)
        return [{**base, "variant": v.name, "role": v.role, "status": status, "error": msg} for v in variants]

    before = {id(v): v.stats() for v, _ in case.candidates}
    cands = [c for _, c in case.candidates]
    run_interleaved(cands, s.warmup, s.repeats, dev)

    mem: dict[int, dict[str, Any]] = {}
    if s.memory_pass:
        for var, c in case.candidates:
            if not c.alive:
                continue
            held = var.held_bytes()
            try:
                mem[id(var)] = measure_case_memory(c.fn, dev)
            except Exception as e:  # noqa: BLE001
                c.fail(e)
            if not c.alive:
                free_memory(dev)
                continue
            m = mem[id(var)]
            m["pool_idle_mb"], m["cache_held_mb"] = held[0] / _MB, held[1] / _MB
            m["peak_held_mb"] = m.get("peak_alloc_mb", math.nan) + (held[0] + held[1]) / _MB

    rows: list[dict[str, Any]] = []
    medians = {v.role: c.median_s for v, c in case.candidates}
    peaks = {v.role: mem.get(id(v), {}) for v, _ in case.candidates}
    for var, c in case.candidates:
        row: dict[str, Any] = {**base, **shape, "variant": var.name, "role": var.role,
                               "cache_strategy": var.cache_strategy, "memory_kind": var.memory_kind,
                               "status": c.status}
        if c.error:
            row["error"] = c.error
        flops, pairs = useful_flops(s, var, n)
        row["flop_count"] = MODEL if var.model is not None else KERNEL
        heads = int(shape["heads"]) * (len(var.modules()) if var.model is not None else 1)
        row["allowed_pairs"] = int(pairs) if math.isfinite(pairs) else math.nan
        row["density"] = pairs / max(1, dense_pairs(n, heads, bool(shape["causal"])))
        row["flops"] = flops
        if c.alive and c.times_s:
            row.update(spread([t * 1e3 for t in c.times_s], "ms"))
            med = c.median_s
            if math.isfinite(flops):
                row["tflops"] = flops / med / 1e12
                row["gflops"] = flops / med / 1e9
                if matmul_tflops:
                    row["frac_of_matmul"] = row["tflops"] / matmul_tflops
            if s.target == "model":
                row["tokens_per_s"] = s.batch * n / med
            if var.role == "sdpa" or var.name == "sdpa":
                row["speedup_vs_sdpa"] = 1.0
            elif math.isfinite(medians.get("sdpa", math.nan)):
                row["speedup_vs_sdpa"] = medians["sdpa"] / med
            if s.compare_to is not None and var.role == "main":
                row["compare_to"] = s.compare_to
                if math.isfinite(medians.get("compare", math.nan)):
                    row["speedup_vs_compare"] = medians["compare"] / med
        row.update(mem.get(id(var), {}))
        if s.docs is not None:
            row["docs"] = s.docs.spec
            build_s = stats_delta(before[id(var)][0], var.stats()[0], CACHE_COUNTERS).get("build_s", 0.0)
            row.update(doc_columns(var.role, c.fn, build_s, medians, c.median_s if c.alive else math.nan))
        if var.role == "main":
            for role, group, choice in ((COMPARE_CACHE, "cache", s.compare_cache),
                                        (COMPARE_MEMORY, "memory", s.compare_memory)):
                if choice is not None:
                    row.update(pair_columns(group, choice, c.median_s, medians.get(role, math.nan), row,
                                            peaks.get(role, {})))
        cache_b, pool_b = before[id(var)]
        cache_a, pool_a = var.stats()
        row.update(cache_columns(cache_b, cache_a))
        row.update(pool_columns(pool_b, pool_a))
        rows.append(row)
    del case, cands
    free_memory(dev)
    return rows

