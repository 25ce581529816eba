"""The gather plan of ``dilated``: index tensors of every branch of a call, in one cache entry.

Per branch (one (w, r, o) and its heads) the selected positions of every segment are
gathered with one index tensor into a padded (segments, slots) batch; the plan also holds
where each real slot goes back to, the mask that hides the padding, and the branch's
heads. One plan per (pattern, N, causal), so a call makes one cache lookup, not four per
branch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import NamedTuple

import torch

from dilexp.patterns.dilated import Branch, DilatedPattern, segment_positions
from dilexp.patterns.strided import pattern_key


class BranchGather(NamedTuple):
    """idx (S, L) positions of each slot; pos/keep (P,) where the real slots go back to;
    mask (S, 1, L, L) which key slot each query slot sees; heads (Hb,) the branch's heads."""

    idx: torch.Tensor
    pos: torch.Tensor
    keep: torch.Tensor
    mask: torch.Tensor
    heads: torch.Tensor


def segment_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """(S, 1, L, L) bool: which key slot each query slot may see.

    Padding keys are hidden from real queries. Padding *queries* may see every key:
    their outputs are discarded, and a row with no key at all would only invite a
    0/0 (NaN) into the backward pass.
    """
    allowed = valid.unsqueeze(1).expand(-1, valid.shape[1], -1)
    if causal:
        slots = valid.shape[1]
        allowed = allowed & torch.ones(slots, slots, dtype=torch.bool, device=valid.device).tril()
    allowed = allowed | ~valid.unsqueeze(2)
    return allowed.unsqueeze(1).contiguous()


def branch_gather(n: int, b: Branch, causal: bool) -> BranchGather:
    idx, valid = segment_positions(n, b.segment_length, b.dilation_rate, b.offset)
    keep = valid.reshape(-1).nonzero().squeeze(1)
    pos = idx.reshape(-1)[keep]
    heads = torch.tensor(b.heads, dtype=torch.int64)
    return BranchGather(idx, pos, keep, segment_mask(valid, causal), heads)


def build_gather_plan(pattern: DilatedPattern, n: int, num_heads: int, causal: bool) -> tuple[tuple, ...]:
    """One ``BranchGather`` per branch, as plain tuples (every cache strategy moves and sizes
    tuples of tensors; ``BranchGather(*entry)`` names them again)."""
    return tuple(tuple(branch_gather(n, b, causal)) for b in pattern.branches(num_heads))


def gather_key(pattern: DilatedPattern, n: int, num_heads: int, causal: bool) -> tuple[Hashable, ...]:
    """The cache key of ``build_gather_plan`` (its first field names the kind: ``dilated_idx``)."""
    return ("dilated_idx", n, *pattern_key(pattern, num_heads), bool(causal))


def gather_entry(
    pattern: DilatedPattern, n: int, num_heads: int, causal: bool
) -> tuple[tuple[Hashable, ...], Callable[[], tuple[tuple, ...]]]:
    """(key, build) of the plan a ``dilated`` call of length ``n`` looks up: what a cache
    benchmark stores and serves to measure a realistic pattern."""
    return gather_key(pattern, n, num_heads, causal), lambda: build_gather_plan(pattern, n, num_heads, causal)


def positions_entry(n: int, w: int, r: int, o: int) -> tuple[tuple[Hashable, ...], Callable[[], tuple]]:
    """(key, build) of one branch's padded positions alone (``segment_positions``): a small
    stand-in pattern where a full gather plan would hold an N x N mask (one segment, w = N)."""
    return ("dilated_idx", n, w, r, o), lambda: segment_positions(n, w, r, o)
