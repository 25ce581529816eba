"""The ops of a ring call: per block pair, fused attention calls on strided views (``BlockOp``);
per call, all of them with their copy-or-accumulate flags (``RingPlan``, one cache entry
under ``ring_key``). Built from the dilated pattern and a ``ring_layout.Layout`` alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import torch

from dilexp.patterns.dilated import Branch, DilatedPattern
from dilexp.patterns.ring_layout import Layout, UnitMap, first_selected, last_selected
from dilexp.patterns.strided import Piece, heads_slice, pattern_key

# -- block patterns: strided spans instead of index tensors -------------------------------
#
# Within one segment a branch selects an arithmetic progression of positions, so the
# selected positions of (a range of a block) x (one segment) are a strided view of the
# tensor that holds the block, and so are those of several whole segments side by side
# (segments become a batch dimension). Blocks are made of ranges that come from one
# partition of [0, n), so a query range and a key range are either the same range or
# disjoint; that leaves three kinds of work per branch:
#   - same range: every segment the range touches, each one attending to itself (causal
#     or not): whole segments batched into one span, the (at most two) cut ones apart;
#   - disjoint ranges: the single segment that can span both (a segment is an interval,
#     and one that meets both ranges holds the gap between them), all keys allowed, or
#     none when causal and the keys come after the queries.
# No masks and no padding: every op is one fused attention call on views.


@dataclass(frozen=True)
class Span(Piece):
    """Local positions base + s*seg_len + offset + i*rate (s < num_seg, i < slots): improved's
    strided ``Piece`` (``view`` gives (B, num_seg, slots, heads, ...) without a copy)."""

    @property
    def size(self) -> int:
        return self.num_seg * self.slots


HeadRange = tuple[int, int, int]  # (start, stop, step): a slice is unhashable before Python 3.12


@dataclass(frozen=True)
class BlockOp:
    """One fused attention call: the queries of ``q`` against the keys of ``k``, heads ``heads``.

    ``causal``: q and k are the same positions and only keys <= the query count (else all).
    ``q_first`` / ``k_first``: the first op of the call (in ring order) to write these query
    rows / key rows, so it copies its results instead of merging or adding them into
    buffers that would have to be zeroed first (set by ``build_ring_plan``; False in a bare pair).
    ``q_only``: also the last, i.e. no other op touches these query rows: the op's own
    log-sum-exp is final and is kept as the kernel returned it, for the backward.
    """

    head_range: HeadRange
    q: Span
    k: Span
    causal: bool
    q_first: bool = False
    k_first: bool = False
    q_only: bool = False

    @property
    def heads(self) -> slice:
        return slice(*self.head_range)

    @property
    def score_elems(self) -> int:
        """Entries of the (virtual) score block: what bounds a call's work and scratch."""
        return len(range(*self.head_range)) * self.q.num_seg * self.q.slots * self.k.slots


def _region(lo: int, hi: int, seg_start: int, r: int, o: int, local_lo: int) -> Span | None:
    """The selected positions of [lo, hi) (inside the segment starting at seg_start)."""
    first = first_selected(lo, hi, seg_start, r, o)
    if first is None:
        return None
    last = last_selected(lo, hi, seg_start, r, o)
    assert last is not None
    return Span(local_lo, 1, hi - lo, first - lo, r, (last - first) // r + 1)


def _range_spans(g0: int, g1: int, l0: int, br: Branch) -> list[Span]:
    """The spans of one range [g0, g1) (local start l0): whole segments in one, cut ones apart."""
    w, r, o = br.segment_length, br.dilation_rate, br.offset
    full_lo, full_hi = -(-g0 // w), g1 // w  # whole segments inside the range: [full_lo, full_hi)
    spans = []
    if full_hi > full_lo and o < w:
        spans.append(Span(l0 + full_lo * w - g0, full_hi - full_lo, w, o, r, -(-(w - o) // r)))
    for s in sorted({g0 // w, (g1 - 1) // w}):
        if full_lo <= s < full_hi:
            continue
        lo, hi = max(g0, s * w), min(g1, (s + 1) * w)
        span = _region(lo, hi, s * w, r, o, l0 + lo - g0)
        if span is not None:
            spans.append(span)
    return spans


def _branch_heads(br: Branch) -> HeadRange:
    heads = heads_slice(br.heads, "ring")
    return heads.start, heads.stop, heads.step or 1


def _split(g0: int, g1: int, l0: int, cuts: Sequence[int]) -> list[tuple[int, int, int]]:
    edges = [g0, *(c for c in cuts if g0 < c < g1), g1]
    return [(a, b, l0 + a - g0) for a, b in zip(edges, edges[1:], strict=False)]


def _aligned(q_unit: UnitMap, k_unit: UnitMap) -> list[tuple[int, int, int, int, int, int]]:
    """(q range, k range) pairs cut so that each two are the same range or disjoint.

    Blocks of one call come from one partition of [0, n), so nothing is cut there; the
    cuts only serve arbitrary blocks (tests, inspection).
    """
    out = []
    for g0, g1, l0 in q_unit:
        for h0, h1, m0 in k_unit:
            if (g0, g1) == (h0, h1) or g1 <= h0 or h1 <= g0:
                out.append((g0, g1, l0, h0, h1, m0))
                continue
            # Cut at each other's ends: any two pieces are then the same range or disjoint.
            out.extend((*a, *b) for a in _split(g0, g1, l0, (h0, h1)) for b in _split(h0, h1, m0, (g0, g1)))
    return out


def build_block_pattern(
    branches: Sequence[Branch], q_unit: UnitMap, k_unit: UnitMap, causal: bool
) -> tuple[BlockOp, ...]:
    """The ops of one (query block, key block) pair; empty iff the pair has no allowed entry."""
    ops = []
    for br in branches:
        heads = _branch_heads(br)
        w, r, o = br.segment_length, br.dilation_rate, br.offset
        for g0, g1, l0, h0, h1, m0 in _aligned(q_unit, k_unit):
            if (g0, g1) == (h0, h1):
                for sq in _range_spans(g0, g1, l0, br):
                    sk = replace(sq, base=m0 + sq.base - l0)  # same positions, K/V's tensor
                    ops.append(BlockOp(heads, sq, sk, causal))
                continue
            if causal and h0 >= g1:  # every key after every query
                continue
            for s in range(max(g0, h0) // w, (min(g1, h1) - 1) // w + 1):
                q_lo, q_hi = max(g0, s * w), min(g1, (s + 1) * w)
                k_lo, k_hi = max(h0, s * w), min(h1, (s + 1) * w)
                if q_hi <= q_lo or k_hi <= k_lo:
                    continue
                sq = _region(q_lo, q_hi, s * w, r, o, l0 + q_lo - g0)
                sk = _region(k_lo, k_hi, s * w, r, o, m0 + k_lo - h0)
                if sq is not None and sk is not None:
                    ops.append(BlockOp(heads, sq, sk, False))
    return tuple(ops)


@dataclass(frozen=True, eq=False)
class RingPlan:
    """Every op of one call, per K/V shard (``steps[j]``), and which buffers need zeros.

    ``q_zero``: head ranges of the query-side buffers (output, dQ) holding rows no op
    writes first (unselected positions get an exact zero); ``k_zero`` the same for dK/dV
    of the single-process call. None: zero everything (branches share heads).
    A plain object rather than a tuple, so the pattern cache serves it as is instead of
    walking (and rebuilding) nested tuples on every hit.
    """

    steps: tuple[tuple[BlockOp, ...], ...]
    q_zero: tuple[HeadRange, ...] | None
    k_zero: tuple[HeadRange, ...] | None
    # Distinct sizes of the causal ops: the masks the portable kernel needs (``causal_masks``).
    causal_sizes: tuple[int, ...] = ()

    def ops(self) -> list[BlockOp]:
        return [op for step in self.steps for op in step]


def ring_order(layout: Layout) -> list[int]:
    """The shards in the order a rank computes against them: (rank - t) mod P for t = 0, 1, ..."""
    return [(layout.rank - t) % layout.world for t in range(layout.world)]


def build_ring_plan(branches: Sequence[Branch], layout: Layout, causal: bool) -> RingPlan:
    """All ops of this rank's call with their copy-or-accumulate flags.

    The first op (in ring order) to write a (heads, rows) span copies; later ones merge
    by log-sum-exp (forward) or add (backward). Spans of one branch are equal or disjoint
    (``_range_spans``), so "first" is exact per span; that needs the branches' heads to
    be disjoint (the "grouped" layout). With "all" a head sums several branches whose
    spans overlap partially, so every op accumulates into zeroed buffers.
    """
    steps = [
        [op for a, b in pairs
         for op in build_block_pattern(branches, layout.q_units[a], layout.kv_units[j][b], causal)]
        for j, pairs in enumerate(layout.pairs)
    ]
    heads = [h for br in branches for h in br.heads]
    if len(heads) != len(set(heads)):
        return RingPlan(tuple(tuple(s) for s in steps), None, None, _causal_sizes(steps))
    seen_q: set[tuple[HeadRange, Span]] = set()
    seen_k: set[tuple[int, HeadRange, Span]] = set()
    covered_q: Counter[HeadRange] = Counter()
    covered_k: Counter[HeadRange] = Counter()
    marked: list[list[BlockOp]] = [[] for _ in steps]
    writers = Counter((op.head_range, op.q) for s in steps for op in s)
    for j in ring_order(layout):
        for op in steps[j]:
            q_first = (op.head_range, op.q) not in seen_q
            k_first = (j, op.head_range, op.k) not in seen_k
            seen_q.add((op.head_range, op.q))
            seen_k.add((j, op.head_range, op.k))
            covered_q[op.head_range] += op.q.size if q_first else 0
            covered_k[op.head_range] += op.k.size if k_first and j == layout.rank else 0
            marked[j].append(replace(op, q_first=q_first, k_first=k_first,
                                     q_only=writers[(op.head_range, op.q)] == 1))
    n_local = layout.local_len
    ranges = [_branch_heads(br) for br in branches]
    return RingPlan(
        tuple(tuple(s) for s in marked),
        tuple(h for h in ranges if covered_q[h] < n_local),
        tuple(h for h in ranges if covered_k[h] < n_local),
        _causal_sizes(marked),
    )


def _causal_sizes(steps: Sequence[Sequence[BlockOp]]) -> tuple[int, ...]:
    return tuple(sorted({op.k.slots for step in steps for op in step if op.causal}))


def causal_masks(sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """One (size, size) bool mask of the entries above the diagonal per size: what the portable
    kernel hides in a causal op (the fused one is told ``is_causal`` instead)."""
    return tuple(torch.ones(n, n, dtype=torch.bool).triu(1) for n in sizes)


def masks_key(sizes: Sequence[int]) -> tuple[Hashable, ...]:
    """The cache key of ``causal_masks(sizes)``."""
    return ("ring_causal_mask", tuple(sizes))


def ring_key(pattern: DilatedPattern, num_heads: int, layout: Layout, chunks: int, placement: str,
             causal: bool) -> tuple[Hashable, ...]:
    """The cache key of ``build_ring_plan`` for one rank's call shape."""
    return ("ring_plan", pattern_key(pattern, num_heads), layout.n, layout.world, layout.rank, chunks, placement,
            bool(causal))
