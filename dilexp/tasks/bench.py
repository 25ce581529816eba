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

``peak_held_mb`` adds to a candidate's ``peak_alloc_mb`` what its pool and pattern caches held
idle when the memory call began: a reused buffer or a cached pattern makes no allocation
during the call, yet it is memory the candidate keeps, so a pool or cache is not credited
with memory it merely set aside earlier. The ``peak_vs_*`` ratios use it.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from dilexp.attention import Attention, available, capabilities
from dilexp.attention.registry import settings_of
from dilexp.bench.flops import MODES, attention_flops, attention_pairs, dense_pairs, matmul_flops, model_flops
from dilexp.bench.memory import measure_case_memory
from dilexp.bench.report import BenchLoggers, case_prefix, print_table, row_metrics, summary_metrics, write_csv
from dilexp.bench.timing import Candidate, free_memory, is_oom, run_interleaved, spread
from dilexp.cache import STRATEGIES, PatternCache, build_cache, collect_stats, pattern_nbytes, pregenerate_patterns
from dilexp.errors import ConfigError
from dilexp.memory import POOLS
from dilexp.models import GPT
from dilexp.paths import CONF_DIR
from dilexp.patterns.dilated import DilatedPattern
from dilexp.patterns.gather import gather_entry, positions_entry
from dilexp.tasks.components import AttentionParts, apply_hardware, attention_parts, build_model, compute_device
from dilexp.tasks.context import JobContext, resolved
from dilexp.telemetry.record import RunRecord

TARGETS = ("attention", "model", "cache")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
CSV_NAME = "bench.csv"
# The role of the candidates built from bench.compare_cache / bench.compare_memory.
COMPARE_CACHE = "compare_cache"
COMPARE_MEMORY = "compare_memory"
_MB = float(2**20)
log = logging.getLogger(__name__)
# Counters (reported as their growth over a case); every other stat is a level (entries,
# bytes held, peaks) and is reported as it stands at the end of the case.
_CACHE_COUNTERS = frozenset(("hits", "misses", "evictions", "promotions", "demotions", "h2d_copies", "h2d_bytes",
                             "pregenerated", "build_s", "lookup_s"))
_POOL_COUNTERS = frozenset(("requests", "reuses", "allocations", "releases", "ignored_releases", "dropped",
                            "evictions", "evicted_bytes", "cleanups", "cleanup_bytes", "cleared_bytes",
                            "dropped_bytes", "oom_retries", "reclaims", "reclaimed_bytes", "allocated_bytes"))
_CACHE_COLUMNS = ("hits", "misses", "hit_rate", "evictions", "entries", "bytes", "promotions", "demotions",
                  "h2d_copies", "h2d_bytes", "build_s", "hot_entries", "hot_bytes", "cold_entries",
                  "cold_bytes", "pregenerated")


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    target: str
    seq_lens: tuple[int, ...]
    mode: str
    causal: bool
    batch: int
    heads: int
    head_dim: int
    dtype_name: str
    warmup: int
    repeats: int
    baseline_sdpa: bool
    compare_to: str | None
    compare_cache: str | None
    compare_memory: str | None
    matmul_reference: bool
    matmul_size: int
    memory_pass: bool
    vocab_size: int
    cache_calls: int
    cache_miss_calls: int

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]


def _int(node: DictConfig, key: str, minimum: int) -> int:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"bench.{key}", value, "must be an integer")
    if value < minimum:
        raise ConfigError(f"bench.{key}", value, f"must be >= {minimum}")
    return value


def _bool(node: DictConfig, key: str) -> bool:
    value = node.get(key)
    if not isinstance(value, bool):
        raise ConfigError(f"bench.{key}", value, "must be true or false")
    return value


def read_settings(cfg: DictConfig) -> BenchSettings:
    """The ``bench:`` node, checked; every bad value raises a ConfigError naming ``bench.<field>``."""
    node = cfg.get("bench")
    if node is None:
        raise ConfigError("bench", None, "missing: select the bench task with task=bench")
    target = node.get("target")
    if target not in TARGETS:
        raise ConfigError("bench.target", target, f"choose one of {list(TARGETS)}")
    mode = node.get("mode")
    if mode not in MODES:
        raise ConfigError("bench.mode", mode, f"choose one of {list(MODES)}")
    raw = node.get("seq_lens")
    seq_lens = OmegaConf.to_container(raw) if OmegaConf.is_list(raw) else raw
    if isinstance(seq_lens, int) and not isinstance(seq_lens, bool):
        seq_lens = [seq_lens]
    if not isinstance(seq_lens, list) or not seq_lens:
        raise ConfigError("bench.seq_lens", seq_lens, "must be a non-empty list of sequence lengths")
    for n in seq_lens:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("bench.seq_lens", seq_lens, f"every length must be an integer >= 1, got {n!r}")
    dtype_name = str(node.get("dtype"))
    if dtype_name not in DTYPES:
        raise ConfigError("bench.dtype", dtype_name, f"choose one of {sorted(DTYPES)}")
    compare_to = node.get("compare_to")
    if compare_to is not None:
        compare_to = str(compare_to)
        if compare_to not in available():
            raise ConfigError("bench.compare_to", compare_to, f"unknown variant; choose one of {available()} or null")
        if compare_to == str(cfg.attention.name):
            raise ConfigError("bench.compare_to", compare_to, "is the benchmarked variant itself (attention=...)")
        if compare_to == "sdpa" and bool(node.get("baseline_sdpa")):
            raise ConfigError("bench.compare_to", compare_to, "sdpa is already the baseline (bench.baseline_sdpa)")
    compare_cache = _compare_choice(cfg, node, "compare_cache", "cache", "strategy", sorted(STRATEGIES), str(target))
    compare_memory = _compare_choice(cfg, node, "compare_memory", "memory", "kind", sorted(POOLS), str(target))
    return BenchSettings(
        target=str(target), seq_lens=tuple(seq_lens), mode=str(mode), causal=_bool(node, "causal"),
        batch=_int(node, "batch", 1), heads=_int(node, "heads", 1), head_dim=_int(node, "head_dim", 1),
        dtype_name=dtype_name, warmup=_int(node, "warmup", 0), repeats=_int(node, "repeats", 1),
        baseline_sdpa=_bool(node, "baseline_sdpa"), compare_to=compare_to,
        compare_cache=compare_cache, compare_memory=compare_memory,
        matmul_reference=_bool(node, "matmul_reference"), matmul_size=_int(node, "matmul_size", 1),
        memory_pass=_bool(node, "memory_pass"), vocab_size=_int(node, "vocab_size", 2),
        cache_calls=_int(node, "cache_calls", 1), cache_miss_calls=_int(node, "cache_miss_calls", 1),
    )


def _compare_choice(cfg: DictConfig, node: DictConfig, key: str, group: str, field_name: str, choices: list[str],
                    target: str) -> str | None:
    """``bench.compare_cache`` / ``bench.compare_memory``: null, or an option of the group other than the run's."""
    value = node.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"bench.{key}", value, f"choose one of {choices} or null")
    if value not in choices:
        raise ConfigError(f"bench.{key}", value, f"unknown {group} {field_name}; choose one of {choices} or null")
    if target == "cache":
        raise ConfigError(f"bench.{key}", value, "applies to bench.target=attention or model, not cache")
    own = str((cfg.get(group) or {}).get(field_name, "none"))
    if value == own:
        raise ConfigError(f"bench.{key}", value, f"is the run's own {group}={own}; pick another to compare with")
    return value


def with_attention(cfg: DictConfig, name: str, keep_settings: bool) -> DictConfig:
    """A copy of ``cfg`` whose attention is ``name``: with the same pattern settings
    (a compared variant computes the same function), or none (full SDPA). A variant that
    takes no pool (sdpa, flex) gets ``memory=none``: it would refuse the run's pool."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        if keep_settings:
            # The pattern settings carry over; a setting only the main variant has (a ring's
            # `chunks`, `placement`) does not.
            accepted = settings_of(name) if name in available() else None
            kept = {k: v for k, v in out.attention.items() if k != "name" and (accepted is None or k in accepted)}
            out.attention = OmegaConf.create({"name": name, **kept})
        else:
            out.attention = OmegaConf.create({"name": name})
        if name in available() and not capabilities(name).pool:
            out.memory = OmegaConf.create({"kind": "none"})  # it has no buffers to take from a pool
    return out


def with_group(cfg: DictConfig, group: str, field_name: str, choice: str) -> DictConfig:
    """A copy of ``cfg`` whose cache (or memory) node is ``choice`` as ``<group>=<choice>`` on the
    command line would give it: that option's yaml (so a twin with ``memory=bucketed`` gets the
    same reclaim/exact settings as a main build with it), or the class defaults without one."""
    out = copy.deepcopy(cfg)
    path = Path(CONF_DIR) / group / f"{choice}.yaml"
    node = OmegaConf.load(path) if path.is_file() else OmegaConf.create({})
    with open_dict(node):
        node[field_name] = choice
    with open_dict(out):
        out[group] = node
    return out


# -- what is timed ----------------------------------------------------------------------------


@dataclass
class Variant:
    """One attention variant (or a model around it) and its caches and pool."""

    role: str  # main | sdpa | compare | compare_cache | compare_memory
    name: str
    parts: AttentionParts
    cache_strategy: str = "none"
    memory_kind: str = "none"
    attn: Attention | None = None
    model: GPT | None = None
    optimizer: torch.optim.Optimizer | None = None

    def modules(self) -> list[Attention]:
        if self.model is not None:
            return self.model.attention_modules()
        return [self.attn] if self.attn is not None else []


def attention_step(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   grad_out: torch.Tensor | None) -> Any:
    """The timed unit of the attention target: forward, or forward + backward to q, k, v.

    ``torch.autograd.grad`` rather than ``.backward()``: no ``.grad`` accumulation to
    clear between calls, and nothing kept alive after the call.
    """
    if grad_out is None:
        with torch.no_grad():
            return attn(q, k, v, causal=causal)
    out = attn(q, k, v, causal=causal)
    return torch.autograd.grad(out, (q, k, v), grad_out)


def model_step(model: GPT, optimizer: torch.optim.Optimizer | None, tokens: torch.Tensor,
               autocast_dtype: torch.dtype | None) -> Any:
    """The timed unit of the model target: one training step (or a forward + loss when no optimizer)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    device_type = tokens.device.type
    if optimizer is None:
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            logits = model(inputs)
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    return loss.detach()


# -- prepare ----------------------------------------------------------------------------------


class PreparedBench:
    """Everything built and checked from the config before any timing."""

    def __init__(self, cfg: DictConfig) -> None:
        self.settings = read_settings(cfg)
        apply_hardware(cfg)
        self.device = compute_device(cfg)
        s = self.settings
        if s.dtype in (torch.float16,) and self.device.type == "cpu" and s.target == "model":
            raise ConfigError("bench.dtype", s.dtype_name, "float16 autocast needs a GPU; use bfloat16 on a CPU")
        self.variants: list[Variant] = []
        main = str(cfg.attention.name)
        plan = [("main", main, cfg)]
        if s.baseline_sdpa and main != "sdpa" and s.target != "cache":
            plan.append(("sdpa", "sdpa", with_attention(cfg, "sdpa", keep_settings=False)))
        if s.compare_to is not None and s.target != "cache":
            plan.append(("compare", s.compare_to,
                         with_attention(cfg, s.compare_to, keep_settings=s.compare_to != "sdpa")))
        # read_settings has refused these for target=cache.
        if s.compare_cache is not None:
            plan.append((COMPARE_CACHE, main, with_group(cfg, "cache", "strategy", s.compare_cache)))
        if s.compare_memory is not None:
            plan.append((COMPARE_MEMORY, main, with_group(cfg, "memory", "kind", s.compare_memory)))
        for role, name, vcfg in plan:
            self.variants.append(self._build(role, name, vcfg, cfg))
        self.cache_strategy = str(cfg.cache.get("strategy", "none"))

    def _build(self, role: str, name: str, vcfg: DictConfig, cfg: DictConfig) -> Variant:
        s = self.settings
        kinds = {"cache_strategy": str(vcfg.cache.get("strategy", "none")),
                 "memory_kind": str(vcfg.memory.get("kind", "none"))}
        try:
            if s.target == "model":
                # The same seed for every variant: identical weights, only the attention differs.
                torch.manual_seed(int(cfg.get("seed", 0)))
                model, parts = build_model(vcfg, s.vocab_size)
                model.to(self.device)
                return Variant(role, name, parts, model=model, **kinds)
            parts = attention_parts(vcfg, s.heads, s.head_dim)
            return Variant(role, name, parts, attn=parts.make().to(self.device), **kinds)
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


# -- run --------------------------------------------------------------------------------------


def _stats_delta(before: dict[str, float], after: dict[str, float], counters: frozenset[str]) -> dict[str, float]:
    out = {k: (v - before.get(k, 0.0)) if k in counters else v for k, v in after.items()}
    # Rates over the case's own calls, not over the run so far.
    if "hit_rate" in out:
        calls = out.get("hits", 0.0) + out.get("misses", 0.0)
        out["hit_rate"] = out.get("hits", 0.0) / calls if calls else 0.0
    if "reuse_rate" in out:
        out["reuse_rate"] = out.get("reuses", 0.0) / out["requests"] if out.get("requests") else 0.0
    return out


def _variant_stats(v: Variant) -> tuple[dict[str, float], dict[str, float]]:
    return collect_stats(v.parts.caches), dict(v.parts.pool.stats())


def _stat_columns(cache: dict[str, float], pool: dict[str, float]) -> dict[str, float]:
    out = {f"cache_{k}": cache[k] for k in _CACHE_COLUMNS if k in cache}
    out.update({f"pool_{k}": float(val) for k, val in pool.items()})
    return out


def _held_bytes(var: Variant) -> tuple[float, float]:
    """(idle pool bytes, cached pattern bytes) a candidate holds outside any call."""
    st = var.parts.pool.stats()
    # idle_bytes adds the reclaimable buffers (memory.reclaim) to the released ones.
    pool = float(st.get("idle_bytes", st.get("pooled_bytes", 0.0)))
    cache = float(collect_stats(var.parts.caches).get("bytes", 0.0))
    return pool, cache


def _pair_columns(group: str, choice: str, main_s: float, other_s: float, main_mem: dict[str, Any],
                  other_mem: dict[str, Any]) -> dict[str, Any]:
    """The main row's columns against its twin built with ``<group>=<choice>``: speedup
    (other median / main median, > 1: main is faster), both peaks, and the peak ratio
    (main / other, <= 1: main holds no more)."""
    tag = f"{group}_{choice}"
    out: dict[str, Any] = {f"compare_{group}": choice}
    if math.isfinite(main_s) and math.isfinite(other_s):
        out[f"speedup_vs_{tag}"] = other_s / main_s
    for key in ("peak_alloc_mb", "peak_held_mb"):
        if key in other_mem:
            out[f"{key}_{tag}"] = other_mem[key]
    a, b = main_mem.get("peak_held_mb", math.nan), other_mem.get("peak_held_mb", math.nan)
    if math.isfinite(a) and math.isfinite(b) and b > 0:
        out[f"peak_vs_{tag}"] = a / b
    return out


@dataclass
class Case:
    """One sequence length: the candidates, with how to rebuild their inputs."""

    n: int
    candidates: list[tuple[Variant, Candidate]] = field(default_factory=list)


def _attention_case(p: PreparedBench, n: int) -> tuple[Case, dict[str, Any]]:
    s, dev = p.settings, p.device
    shape = (s.batch, n, s.heads, s.head_dim)
    grad = s.mode == "fwd_bwd"
    gen = torch.Generator(device="cpu").manual_seed(n)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float32).to(dev, s.dtype).requires_grad_(grad)
               for _ in range(3))
    g = torch.randn(shape, generator=gen, dtype=torch.float32).to(dev, s.dtype) if grad else None
    case = Case(n)
    for var in p.variants:
        assert var.attn is not None
        attn = var.attn

        # Looked up in the module at call time, so tests can replace attention_step.
        def fn(attn: Attention = attn) -> Any:
            return attention_step(attn, q, k, v, s.causal, g)

        case.candidates.append((var, Candidate(var.role, fn)))
    return case, {"batch": s.batch, "heads": s.heads, "head_dim": s.head_dim, "causal": s.causal}


def _model_case(p: PreparedBench, n: int) -> tuple[Case, dict[str, Any]]:
    s, dev = p.settings, p.device
    gen = torch.Generator(device="cpu").manual_seed(n)
    # n + 1 tokens: n inputs and their n next-token targets.
    tokens = torch.randint(0, s.vocab_size, (s.batch, n + 1), generator=gen).to(dev)
    autocast = None if s.dtype == torch.float32 else s.dtype
    case = Case(n)
    for var in p.variants:
        assert var.model is not None
        if s.mode == "fwd_bwd" and var.optimizer is None:
            var.optimizer = torch.optim.AdamW(var.model.parameters(), lr=1e-4)
        var.model.train(s.mode == "fwd_bwd")

        def fn(model: GPT = var.model, opt: Any = var.optimizer if s.mode == "fwd_bwd" else None) -> Any:
            return model_step(model, opt, tokens, autocast)

        case.candidates.append((var, Candidate(var.role, fn)))
    m = p.main.model
    assert m is not None
    return case, {"batch": s.batch, "heads": m.cfg.n_head, "head_dim": m.cfg.head_dim, "causal": True}


def _useful_flops(p: PreparedBench, var: Variant, n: int) -> tuple[float, float]:
    """(useful FLOPs, allowed pairs) of one call; NaN where a variant's pattern cannot be counted."""
    s = p.settings
    if var.model is not None:
        counts = [attention_pairs(a, n, causal=True) for a in var.model.attention_modules()]
        pairs = math.nan if any(c is None for c in counts) else float(sum(c or 0 for c in counts))
        return model_flops(var.model, n, s.batch, s.mode), pairs
    assert var.attn is not None
    count = attention_pairs(var.attn, n, s.causal)
    return attention_flops(var.attn, n, s.batch, s.causal, s.mode), math.nan if count is None else float(count)


def run_case(p: PreparedBench, n: int, matmul_tflops: float | None) -> list[dict[str, Any]]:
    """All candidates at one N: pregenerate, interleaved timing, memory pass, rows."""
    s, dev = p.settings, p.device
    base = {"target": s.target, "seq_len": n, "dtype": s.dtype_name, "mode": s.mode, "device": str(dev),
            "warmup": s.warmup, "repeats": s.repeats}
    make = _model_case if s.target == "model" else _attention_case
    # Each case starts with empty pools, as its peak figures start from zero: buffers
    # sized for the previous N would otherwise count as idle memory held here.
    for var in p.variants:
        var.parts.pool.clear()
    try:
        for var in p.variants:
            # The model's attention is always causal; the layer's is bench.causal.
            pregenerate_patterns(var.modules(), n, dev, True if s.target == "model" else s.causal)
        case, shape = make(p, n)
    except Exception as e:  # noqa: BLE001 - e.g. the inputs themselves do not fit: every candidate fails alike
        status, msg = ("oom" if is_oom(e) else "error"), f"{type(e).__name__}: {e}"[:500]
        del e
        free_memory(dev)
        return [{**base, "variant": v.name, "role": v.role, "status": status, "error": msg} for v in p.variants]

    before = {id(v): _variant_stats(v) for v, _ in case.candidates}
    cands = [c for _, c in case.candidates]
    run_interleaved(cands, s.warmup, s.repeats, dev)

    mem: dict[int, dict[str, Any]] = {}
    if s.memory_pass:
        for var, c in case.candidates:
            if not c.alive:
                continue
            held = _held_bytes(var)
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
        flops, pairs = _useful_flops(p, var, n)
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
        if var.role == "main":
            for role, group, choice in ((COMPARE_CACHE, "cache", s.compare_cache),
                                        (COMPARE_MEMORY, "memory", s.compare_memory)):
                if choice is not None:
                    row.update(_pair_columns(group, choice, c.median_s, medians.get(role, math.nan), row,
                                             peaks.get(role, {})))
        cache_b, pool_b = before[id(var)]
        cache_a, pool_a = _variant_stats(var)
        row.update(_stat_columns(_stats_delta(cache_b, cache_a, _CACHE_COUNTERS),
                                 _stats_delta(pool_b, pool_a, _POOL_COUNTERS)))
        rows.append(row)
    del case, cands
    free_memory(dev)
    return rows


def matmul_reference(p: PreparedBench) -> dict[str, Any]:
    """A plain fp32 (size x size) matmul: the machine's practical dense throughput, in the same run."""
    s, dev = p.settings, p.device
    row: dict[str, Any] = {"target": "reference", "variant": "matmul", "role": "reference", "seq_len": s.matmul_size,
                           "dtype": "float32", "mode": "fwd", "device": str(dev), "warmup": max(1, s.warmup),
                           "repeats": s.repeats, "flops": matmul_flops(s.matmul_size)}
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(s.matmul_size, s.matmul_size, generator=gen).to(dev)
        b = torch.randn(s.matmul_size, s.matmul_size, generator=gen).to(dev)
        c = Candidate("matmul", lambda: torch.mm(a, b))
        run_interleaved([c], max(1, s.warmup), s.repeats, dev)
    except Exception as e:  # noqa: BLE001
        c = Candidate("matmul", lambda: None)
        c.fail(e)
        del e
    row["status"] = c.status
    if c.error:
        row["error"] = c.error
    if c.alive:
        row.update(spread([t * 1e3 for t in c.times_s], "ms"))
        row["tflops"] = row["flops"] / c.median_s / 1e12
        row["gflops"] = row["flops"] / c.median_s / 1e9
    free_memory(dev)
    return row


# -- cache micro-benchmark --------------------------------------------------------------------


def _per_call_ns(calls: int, repeats: int, warmup: int, batch: Callable[[], None],
                 setup: Callable[[], None] | None = None) -> list[float]:
    """Per-call ns of ``batch`` (``calls`` calls), one figure per repeat; GC off while timing,
    as timeit does, so a collection does not land in one batch."""
    out: list[float] = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        gc_was = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter_ns()
            batch()
            dt = time.perf_counter_ns() - t0
        finally:
            if gc_was:
                gc.enable()
        if i >= warmup:
            out.append(dt / calls)
    return out


def _realistic_pattern(p: PreparedBench, n: int) -> tuple[tuple[Any, ...], Callable[[], Any]]:
    """The key and build of the plan a dilated attention looks up at N (patterns/gather.py)."""
    attn = p.main.attn
    pattern = getattr(attn, "pattern", None)
    if isinstance(pattern, DilatedPattern) and attn is not None:
        return gather_entry(pattern, n, attn.num_heads, p.settings.causal)
    return positions_entry(n, n, 1, 0)  # full attention: one segment, every position


def cache_rows(p: PreparedBench, cfg: DictConfig, n: int) -> list[dict[str, Any]]:
    """One row per operation of the configured cache at N, each with its median per-call ns
    and the cache counters of that operation alone (a hit batch must show only hits)."""
    s = p.settings
    settings = {k: v for k, v in (OmegaConf.to_container(cfg.cache, resolve=True) or {}).items()  # type: ignore[union-attr]
                if k != "strategy"}
    cache: PatternCache = build_cache(p.cache_strategy, **settings)
    cache.clear()
    key, build = _realistic_pattern(p, n)
    cpu = torch.device("cpu")
    base = {"target": "cache", "variant": p.cache_strategy, "role": "main", "seq_len": n, "device": str(p.device),
            "warmup": s.warmup, "repeats": s.repeats, "status": "ok"}
    get = cache.get_or_build
    hits, misses = s.cache_calls, s.cache_miss_calls

    def hit_batch() -> None:
        for _ in range(hits):
            get(key, build, cpu)

    def noop(key: Any, build: Any, device: Any) -> None:
        return None

    def overhead_batch() -> None:
        for _ in range(hits):
            noop(key, build, cpu)

    fresh = iter(range(1 << 62))

    def miss_batch() -> None:
        # A key never seen: the full miss path (lookup, build, insert, any eviction).
        for _ in range(misses):
            get((*key, "miss", next(fresh)), build, cpu)

    def build_batch() -> None:
        for _ in range(misses):
            build()

    ops: list[tuple[str, int, Callable[[], None], Callable[[], None] | None]] = [
        ("hit", hits, hit_batch, lambda: get(key, build, cpu)),
        ("miss", misses, miss_batch, cache.clear),
        ("build", misses, build_batch, None),
        ("call_overhead", hits, overhead_batch, None),
    ]
    if p.device.type == "cuda":
        dev = p.device

        def device_hit_batch() -> None:
            for _ in range(hits):
                get(key, build, dev)
            torch.cuda.synchronize(dev)

        ops.append(("hit_on_device", hits, device_hit_batch, lambda: get(key, build, dev)))

    rows = []
    for op, calls, batch, setup in ops:
        row = {**base, "op": op, "calls_per_repeat": calls, "pattern_bytes": pattern_nbytes(build())}
        before = cache.stats()
        try:
            times = _per_call_ns(calls, s.repeats, s.warmup, batch, setup)
            row.update(spread(times, "ns"))
            row["per_call_ns"] = row["median_ns"]
        except Exception as e:  # noqa: BLE001
            row["status"], row["error"] = ("oom" if is_oom(e) else "error"), f"{type(e).__name__}: {e}"[:500]
        # The counters of this op alone: they show that a "hit" batch really hit.
        stats = _stats_delta(before, cache.stats(), _CACHE_COUNTERS)
        row.update({f"cache_{k}": stats[k] for k in _CACHE_COLUMNS if k in stats})
        rows.append(row)
    cache.clear()
    return rows


# -- the task ---------------------------------------------------------------------------------


def _loggers(cfg: DictConfig, ctx: JobContext, record: RunRecord) -> BenchLoggers:
    csv_logger = wandb_logger = None
    loggers = cfg.get("logger") or {}
    if "csv" in loggers:
        try:
            from lightning.pytorch.loggers import CSVLogger

            # version="" puts metrics.csv straight into the run folder, as task=train does.
            csv_logger = CSVLogger(save_dir=str(ctx.run_dir), name="", version="")
        except Exception as e:  # noqa: BLE001
            log.warning("CSV logger could not start (%s); metrics.csv skipped", e)
    if "wandb" in loggers:
        from dilexp.telemetry.wandb_logger import make_wandb_logger

        wandb_logger = make_wandb_logger(cfg.logger.wandb, ctx.run_dir, ctx.run_name(), ctx.group(cfg), ctx.tags(),
                                         resolved(cfg))
        if wandb_logger is not None:
            record.update(wandb={"dir": Path(wandb_logger.save_dir or ctx.run_dir).name, "group": ctx.group(cfg)})
    return BenchLoggers(csv_logger, wandb_logger)


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # No auto-refresh: its thread would take the GIL 10 times a second, inside timed calls.
    return Progress(TextColumn("[bold]bench[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), auto_refresh=False)


def run_bench(cfg: DictConfig, ctx: JobContext, prepared: PreparedBench, record: RunRecord) -> dict[str, Any]:
    p, s = prepared, prepared.settings
    loggers = _loggers(cfg, ctx, record)
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
            if kind == "matmul":
                new = [matmul_reference(p)]
                matmul_tflops = new[0].get("tflops")
            elif s.target == "cache":
                new = cache_rows(p, cfg, n)
            else:
                new = run_case(p, n, matmul_tflops)
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
