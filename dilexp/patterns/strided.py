"""Plans of the dilated pattern (DESIGN section 3) that the variants read as views, not indices.

Every selected position set of a branch (w, r, o) is a strided view: with S = N // w full
segments, x[:, :S*w].unflatten(1, (S, w))[:, :, o::r], and x[:, S*w + o::r] for the
shorter last segment. ``plan_branches`` turns a ``DilatedPattern`` into those views
(``Piece``), one ``BranchPlan`` per branch; ``improved`` computes on them and the ring's
block ops (``patterns.ring_ops``) are pieces too.

Each plan has its own cache key (``strided_key``), built here, so a variant makes one
``get_or_build`` per call and nobody else spells the key by hand.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from dilexp.patterns.dilated import DilatedPattern


def heads_index(heads: Sequence[int]) -> slice | list[int]:
    """A slice when the heads form an arithmetic progression, so selecting them is a view.

    Every layout of the dilated pattern gives such heads (a contiguous group, or the heads
    of a group / of all heads with one offset, i.e. step r); the list is a safety net.
    """
    hs = list(heads)
    if len(hs) == 1:
        return slice(hs[0], hs[0] + 1)
    step = hs[1] - hs[0]
    if step > 0 and all(b - a == step for a, b in zip(hs, hs[1:], strict=False)):
        return slice(hs[0], hs[-1] + 1, step)
    return hs


def heads_slice(heads: Sequence[int], who: str) -> slice:
    """``heads_index`` that must be a slice: the views of a plan need a strided head range."""
    index = heads_index(heads)
    if not isinstance(index, slice):  # the pattern's layouts always give a progression
        raise RuntimeError(f"{who}: heads {tuple(heads)} of a branch are not a strided range")
    return index


def pattern_key(pattern: DilatedPattern, num_heads: int) -> tuple[Hashable, ...]:
    """What identifies a dilated pattern applied to ``num_heads`` heads, for cache keys."""
    return (pattern.segment_lengths, pattern.dilation_rates, pattern.offsets, pattern.heads,
            operator.index(num_heads))


@dataclass(frozen=True)
class Piece:
    """Positions base + s*seg_len + offset + j*rate (s < num_seg, j < slots): one strided view."""

    base: int
    num_seg: int
    seg_len: int
    offset: int
    rate: int
    slots: int

    def view(self, x: torch.Tensor, heads: slice) -> torch.Tensor:
        """(B, N, H, ...) -> (B, num_seg, slots, Hb, ...) view of the selected positions."""
        span = x[:, self.base : self.base + self.num_seg * self.seg_len]
        stop = self.offset + (self.slots - 1) * self.rate + 1
        return span.unflatten(1, (self.num_seg, self.seg_len))[:, :, self.offset : stop : self.rate, heads]


@dataclass(frozen=True)
class BranchPlan:
    """One branch: its heads, the pieces it computes, and the views it leaves unselected."""

    heads: slice
    rate: int
    pieces: tuple[Piece, ...]
    blanks: tuple[Piece, ...]


# Past this many strided fills, one fill over the branch's heads is cheaper than skipping
# the selected positions.
_MAX_BLANK_VIEWS = 8


def plan_branches(pattern: DilatedPattern, n: int, num_heads: int) -> tuple[BranchPlan, ...]:
    """Split every branch into its (at most two) strided pieces for a length-``n`` sequence."""
    plans = []
    for b in pattern.branches(num_heads):
        w, r, o = b.segment_length, b.dilation_rate, b.offset
        heads = heads_slice(b.heads, "improved")
        full = n // w
        tail = n - full * w
        # (base, segments, segment length) of the full segments and of the ragged tail.
        regions = [reg for reg in ((0, full, w), (full * w, 1, tail)) if reg[1] and reg[2]]
        pieces, blanks = [], []
        for base, segs, length in regions:
            for off in range(min(r, length)):
                piece = Piece(base, segs, length, off, r, -(-(length - off) // r))
                (pieces if off == o else blanks).append(piece)
        if len(blanks) > _MAX_BLANK_VIEWS:
            blanks = [Piece(0, 1, n, 0, 1, n)]
        plans.append(BranchPlan(heads, r, tuple(pieces), tuple(blanks)))
    return tuple(plans)


def strided_key(pattern: DilatedPattern, n: int, num_heads: int) -> tuple[Hashable, ...]:
    """The cache key of ``plan_branches(pattern, n, num_heads)`` (one plan serves both masks)."""
    return ("improved_plan", n, *pattern_key(pattern, num_heads))
