"""The ``bench:`` node of a config, checked: every bad value is a ConfigError naming ``bench.<field>``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from dilexp.attention import available
from dilexp.bench.documents import DocLengths, parse_docs
from dilexp.bench.flops import MODES
from dilexp.cache import STRATEGIES
from dilexp.errors import ConfigError
from dilexp.memory import POOLS

TARGETS = ("attention", "model", "cache")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


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
    # Packed documents (bench.docs): a length distribution, None for plain sequences.
    docs: DocLengths | None = None

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
    docs = parse_docs(node.get("docs"))
    if docs is not None and target == "cache":
        raise ConfigError("bench.docs", node.get("docs"), "applies to bench.target=attention or model, not cache")
    return BenchSettings(
        target=str(target), seq_lens=tuple(seq_lens), mode=str(mode), causal=_bool(node, "causal"),
        batch=_int(node, "batch", 1), heads=_int(node, "heads", 1), head_dim=_int(node, "head_dim", 1),
        dtype_name=dtype_name, warmup=_int(node, "warmup", 0), repeats=_int(node, "repeats", 1),
        baseline_sdpa=_bool(node, "baseline_sdpa"), compare_to=compare_to,
        compare_cache=compare_cache, compare_memory=compare_memory,
        matmul_reference=_bool(node, "matmul_reference"), matmul_size=_int(node, "matmul_size", 1),
        memory_pass=_bool(node, "memory_pass"), vocab_size=_int(node, "vocab_size", 2),
        cache_calls=_int(node, "cache_calls", 1), cache_miss_calls=_int(node, "cache_miss_calls", 1),
        docs=docs,
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
