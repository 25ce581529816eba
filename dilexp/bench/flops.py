"""Useful FLOPs by the two conventions of DESIGN section 8; only the query-key pairs a pattern allows count.

- **Kernel** (task=bench, attention target): the FlashAttention benchmark count. Forward is
  4 * D per allowed pair (QK^T and PV, 2 each); backward is 2.5x forward (it recomputes the
  scores), so forward + backward is 14 * D. FA2/FA3/FlexAttention TFLOP/s are quoted this way.
- **Model** (a training step, bench.target=model, MFU): the PaLM/nanoGPT count. 2 * params per
  token forward, 6 with backward, for the dense layers; attention 4 * D per allowed pair and
  layer forward, backward 2x forward (no recomputation counted), so 12 * D forward + backward.

Softmax, masks and copies are not counted: they are overhead, not useful work. Every figure
built from these counts says which one it used: a bench row's ``flop_count`` (``KERNEL`` or
``MODEL``), the metrics line's "TFLOP/s (model)" and "MFU (model)" (``dilexp.metrics``).
"""

from __future__ import annotations

import math

from torch import nn

from dilexp.attention.base import Attention
from dilexp.patterns.dilated import DilatedPattern

MODES = ("fwd", "fwd_bwd")
KERNEL, MODEL = "kernel", "model"
# FLOPs per allowed pair, per unit of head_dim, by convention and mode.
PAIR_FLOPS_PER_D: dict[str, dict[str, float]] = {
    KERNEL: {"fwd": 4.0, "fwd_bwd": 14.0},
    MODEL: {"fwd": 4.0, "fwd_bwd": 12.0},
}
# FLOPs per non-embedding parameter per token (model count).
PARAM_FLOPS: dict[str, float] = {"fwd": 2.0, "fwd_bwd": 6.0}
# The kernel count's forward + backward over its forward (14 / 4).
FWD_BWD_FACTOR = PAIR_FLOPS_PER_D[KERNEL]["fwd_bwd"] / PAIR_FLOPS_PER_D[KERNEL]["fwd"]
# Entries of the (H, N, N) mask a pattern without a closed-form count may build: 256 MiB of int64.
DENSE_COUNT_LIMIT = 1 << 25


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def pair_flops(head_dim: int, mode: str, count: str) -> float:
    """FLOPs of one allowed query-key pair of one head under ``count`` (kernel or model)."""
    _check_mode(mode)
    return PAIR_FLOPS_PER_D[count][mode] * head_dim


def dense_pairs(n: int, num_heads: int, causal: bool) -> int:
    """Pairs of full attention, in closed form."""
    return num_heads * (n * (n + 1) // 2 if causal else n * n)


def attention_pairs(attn: Attention, n: int, causal: bool, dense_limit: int | None = DENSE_COUNT_LIMIT) -> int | None:
    """Allowed query-key pairs of one call, all heads, one batch element; None when unknown.

    Full attention and dilated patterns are counted in closed form, as is any variant that
    overrides ``allowed_pairs``. Otherwise ``Attention.allowed_pairs`` would build an
    (H, N, N) int64 mask: beyond ``dense_limit`` entries (GBs at bench lengths) the count is
    left unknown rather than risk running out of memory for a FLOP figure; None: no limit.
    """
    if attn.name == "sdpa":
        return dense_pairs(n, attn.num_heads, causal)
    closed_form = (type(attn).allowed_pairs is not Attention.allowed_pairs
                   or isinstance(getattr(attn, "pattern", None), DilatedPattern))
    if not closed_form and dense_limit is not None and attn.num_heads * n * n > dense_limit:
        return None
    return int(attn.allowed_pairs(n, causal))


def attention_flops(attn: Attention, n: int, batch: int, causal: bool, mode: str) -> float:
    """One attention call by the kernel count; NaN when the pairs cannot be counted."""
    pairs = attention_pairs(attn, n, causal)
    if pairs is None:
        return math.nan
    return pair_flops(attn.head_dim, mode, KERNEL) * pairs * batch


def model_pairs(model: nn.Module, n: int, dense_limit: int | None = DENSE_COUNT_LIMIT) -> int | None:
    """Allowed causal pairs summed over the model's attention layers; None when one is unknown."""
    counts = [attention_pairs(a, n, causal=True, dense_limit=dense_limit) for a in model.attention_modules()]
    if any(c is None for c in counts):
        return None
    return sum(c or 0 for c in counts)


def model_flops(model: nn.Module, n: int, batch: int, mode: str,
                dense_limit: int | None = DENSE_COUNT_LIMIT) -> float:
    """One LM step by the model count: PARAM_FLOPS * non-embedding params * tokens, plus the
    causal attention pairs of every layer; NaN when a layer's pairs cannot be counted.

    ``dilexp.tasks.train`` counts its step with this (``dense_limit=None``), so bench and train agree.
    """
    _check_mode(mode)
    dense = PARAM_FLOPS[mode] * model.num_params(non_embedding=True) * n * batch
    pairs = model_pairs(model, n, dense_limit)
    if pairs is None:
        return math.nan
    attns: list[Attention] = model.attention_modules()
    head_dim = attns[0].head_dim if attns else 0
    return dense + pair_flops(head_dim, mode, MODEL) * pairs * batch


def matmul_flops(size: int) -> float:
    """A (size x size) @ (size x size) product: one multiply and one add per inner term."""
    return 2.0 * float(size) ** 3
