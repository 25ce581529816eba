"""The candidates of a bench run: the configured variant and its twins.

A twin is the run's variant (or model) built again from a changed copy of the config: full
SDPA (``bench.baseline_sdpa``), another variant with the same pattern settings
(``bench.compare_to``), another pattern-cache strategy (``bench.compare_cache``) or another
buffer pool (``bench.compare_memory``). The objects are built by ``dilexp.tasks.bench``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dilexp.attention import Attention, available, capabilities
from dilexp.attention.registry import settings_of
from dilexp.bench.documents import NODOCS
from dilexp.bench.settings import BenchSettings
from dilexp.cache import PatternCache, collect_stats
from dilexp.memory import MemoryPool
from dilexp.models import GPT
from dilexp.paths import CONF_DIR

# The role of the candidates built from bench.compare_cache / bench.compare_memory.
COMPARE_CACHE = "compare_cache"
COMPARE_MEMORY = "compare_memory"


def with_attention(cfg: DictConfig, name: str, keep_settings: bool) -> DictConfig:
    """A copy of ``cfg`` whose attention is ``name``: with the same pattern settings
    (a compared variant computes the same function), or none (full SDPA). A variant that
    takes no pool (sdpa) gets ``memory=none``: it would refuse the run's pool."""
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


@dataclass
class Variant:
    """One attention variant (or a model around it) and its caches and pool."""

    role: str  # main | sdpa | compare | compare_cache | compare_memory | nodocs
    name: str
    caches: list[PatternCache]  # the pattern caches its modules use (one per layer with `local`)
    pool: MemoryPool
    cache_strategy: str = "none"
    memory_kind: str = "none"
    attn: Attention | None = None
    model: GPT | None = None
    optimizer: torch.optim.Optimizer | None = None

    def modules(self) -> list[Attention]:
        if self.model is not None:
            return self.model.attention_modules()
        return [self.attn] if self.attn is not None else []


    def stats(self) -> tuple[dict[str, float], dict[str, float]]:
        """(pattern-cache stats, pool stats) as they stand now."""
        return collect_stats(self.caches), dict(self.pool.stats())

    def held_bytes(self) -> tuple[float, float]:
        """(idle pool bytes, cached pattern bytes) the candidate holds outside any call."""
        st = self.pool.stats()
        # idle_bytes adds the reclaimable buffers (memory.reclaim) to the released ones.
        pool = float(st.get("idle_bytes", st.get("pooled_bytes", 0.0)))
        cache = float(collect_stats(self.caches).get("bytes", 0.0))
        return pool, cache


def plan_variants(cfg: DictConfig, s: BenchSettings) -> list[tuple[str, str, DictConfig]]:
    """(role, variant name, config) of every candidate, the run's own first."""
    main = str(cfg.attention.name)
    plan = [("main", main, cfg)]
    if s.baseline_sdpa and main != "sdpa" and s.target != "cache":
        plan.append(("sdpa", "sdpa", with_attention(cfg, "sdpa", keep_settings=False)))
    if s.compare_to is not None and s.target != "cache":
        plan.append(("compare", s.compare_to, with_attention(cfg, s.compare_to, keep_settings=s.compare_to != "sdpa")))
    # read_settings has refused these for target=cache.
    if s.compare_cache is not None:
        plan.append((COMPARE_CACHE, main, with_group(cfg, "cache", "strategy", s.compare_cache)))
    if s.compare_memory is not None:
        plan.append((COMPARE_MEMORY, main, with_group(cfg, "memory", "kind", s.compare_memory)))
    if s.docs is not None:
        # The same variant on the same tokens without documents (bench.docs): what they cost.
        plan.append((NODOCS, main, cfg))
    return plan
