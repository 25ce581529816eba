"""Config -> objects: caches, pool, attention factory, model, data. Every check happens here,
before any training or timing starts, so a bad setting fails fast and names its field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dilexp.attention import Attention, build
from dilexp.cache import PatternCache, build_cache
from dilexp.errors import ConfigError
from dilexp.memory import MemoryPool, build_pool
from dilexp.models import GPT, GPTConfig


def settings(node: DictConfig | None, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    if node is None:
        return {}
    out = OmegaConf.to_container(node, resolve=True)
    assert isinstance(out, dict)
    return {k: v for k, v in out.items() if k not in drop}


def model_config(cfg: DictConfig, vocab_size: int) -> GPTConfig:
    m = cfg.model
    for key in ("n_layer", "n_head", "d_model"):
        if int(m[key]) < 1:
            raise ConfigError(f"model.{key}", m[key], "must be >= 1")
    if int(m.d_model) % int(m.n_head) != 0:
        raise ConfigError("model.n_head", m.n_head, f"must divide model.d_model={m.d_model}")
    if (int(m.d_model) // int(m.n_head)) % 2 != 0:
        raise ConfigError("model.n_head", m.n_head, "d_model / n_head must be even (rotary positions)")
    return GPTConfig(vocab_size=vocab_size, n_layer=int(m.n_layer), n_head=int(m.n_head), d_model=int(m.d_model),
                     mlp_ratio=int(m.get("mlp_ratio", 4)), dropout=float(m.get("dropout", 0.0)))


@dataclass
class AttentionParts:
    make: Callable[[], Attention]
    caches: list[PatternCache]
    pool: MemoryPool


def attention_parts(cfg: DictConfig, num_heads: int, head_dim: int) -> AttentionParts:
    """A factory of attention modules (one per layer) sharing the run's pool.

    Each module asks `build_cache` for its cache: `local` gives each its own dict,
    process-wide strategies hand back their shared instance.
    """
    if not cfg.hardware.get("context_parallel", False):
        from dilexp.distributed import declare_data_parallel

        # Each rank holds whole sequences: a ring variant must not shard over the ranks (item 11).
        declare_data_parallel()
    cache_cfg = settings(cfg.cache)
    strategy = cache_cfg.pop("strategy", "none")
    mem_cfg = settings(cfg.memory)
    pool = build_pool(mem_cfg.pop("kind", "none"), **mem_cfg)
    attn_cfg = settings(cfg.attention, drop=("name",))
    name = str(cfg.attention.name)
    caches: list[PatternCache] = []

    def make() -> Attention:
        cache = build_cache(strategy, **cache_cfg)
        caches.append(cache)
        return build(name, num_heads=num_heads, head_dim=head_dim, cache=cache, pool=pool, **attn_cfg)

    return AttentionParts(make, caches, pool)


def build_model(cfg: DictConfig, vocab_size: int) -> tuple[GPT, AttentionParts]:
    mcfg = model_config(cfg, vocab_size)
    parts = attention_parts(cfg, mcfg.n_head, mcfg.head_dim)
    return GPT(mcfg, parts.make), parts


def compute_device(cfg: DictConfig) -> torch.device:
    acc = str(cfg.hardware.accelerator)
    if acc in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("hardware.accelerator", acc, "no CUDA device on this machine; use hardware=cpu")
        return torch.device("cuda", 0)
    if acc != "cpu":
        raise ConfigError("hardware.accelerator", acc, "choose 'cpu' or 'gpu'")
    return torch.device("cpu")


def apply_hardware(cfg: DictConfig) -> None:
    threads = cfg.hardware.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
