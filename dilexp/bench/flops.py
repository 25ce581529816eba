"""Useful FLOPs (DESIGN section 8): only the query-key pairs a pattern allows are counted.

Forward attention costs 4 * D FLOPs per allowed pair (QK^T and PV, 2 each); forward +
backward is 2.5x that. Dense layers of a model cost 2 * params per token forward, 6 with
backward. Softmax, masks and copies are not counted: they are overhead, not useful work.
"""

from __future__ import annotations

import math

from torch import nn

from dilexp.attention.base import Attention
from dilexp.patterns.dilated import DilatedPattern

FWD_BWD_FACTOR = 2.5
MODES = ("fwd", "fwd_bwd")
# Entries of the (H, N, N) mask a pattern without a closed-form count may build: 256 MiB of int64.
DENSE_COUNT_LIMIT = 1 << 25


def mode_factor(mode: str) -> float:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return FWD_BWD_FACTOR if mode == "fwd_bwd" else 1.0


def dense_pairs(n: int, num_heads: int, causal: bool) -> int:
    """Pairs of full attention, in closed form."""
    return num_heads * (n * (n + 1) // 2 if causal else n * n)


def attention_pairs(attn: Attention, n: int, causal: bool) -> int | None:
    """Allowed query-key pairs of one call, all heads, one batch element; None when unknown.

    Full attention and dilated patterns are counted in closed form, as is any variant that
    overrides ``allowed_pairs``. Otherwise ``Attention.allowed_pairs`` would build an
    (H, N, N) int64 mask: beyond ``DENSE_COUNT_LIMIT`` entries (GBs at bench lengths)
    the count is left unknown rather than risk running out of memory for a FLOP figure.
    """
    if attn.name == "sdpa":
        return dense_pairs(n, attn.num_heads, causal)
    closed_form = (type(attn).allowed_pairs is not Attention.allowed_pairs
                   or isinstance(getattr(attn, "pattern", None), DilatedPattern))
    if not closed_form and attn.num_heads * n * n > DENSE_COUNT_LIMIT:
        return None
    return int(attn.allowed_pairs(n, causal))


def attention_flops(attn: Attention, n: int, batch: int, causal: bool, mode: str) -> float:
    pairs = attention_pairs(attn, n, causal)
    if pairs is None:
        return math.nan
    return 4.0 * attn.head_dim * pairs * batch * mode_factor(mode)


def model_flops(model: nn.Module, n: int, batch: int, mode: str) -> float:
    """One LM step: 2 (fwd) or 6 (fwd_bwd) * non-embedding params * tokens, plus causal attention pairs.

    Equals ``dilexp.tasks.train.train_flops_per_step`` for fwd_bwd, so bench and train agree.
    """
    tokens = n * batch
    dense = (6.0 if mode == "fwd_bwd" else 2.0) * model.num_params(non_embedding=True) * tokens
    attns: list[Attention] = model.attention_modules()
    counts = [attention_pairs(a, n, causal=True) for a in attns]
    if any(c is None for c in counts):
        return math.nan
    head_dim = attns[0].head_dim if attns else 0
    return dense + 4.0 * head_dim * sum(c or 0 for c in counts) * batch * mode_factor(mode)


def matmul_flops(size: int) -> float:
    """A (size x size) @ (size x size) product: one multiply and one add per inner term."""
    return 2.0 * float(size) ** 3
