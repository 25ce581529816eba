"""What a ring variant computes and sends, decided from the dilated pattern alone.

Vocabulary:
- a *block* is a set of sequence positions handled as one unit: a rank's shard, or a
  sub-chunk of it (``chunks``). It is described by a ``UnitMap``: a tuple of
  ``(global_start, global_stop, local_start)`` triples, i.e. which global positions it
  holds and where they sit in the tensor that holds them;
- a *block pair* (query block, key block) is the unit of work. Its pattern is a tuple of
  ``BlockOp``s, one fused attention call each on strided views of the blocks (see
  ``build_block_pattern``); a pair with no allowed entry is skipped. A call's ops over
  all its pairs form a ``RingPlan``, the object the pattern cache stores.

Emptiness is decided analytically (``ranges_meet``) for every pair of shards, so each rank
knows, without building anything or talking to anyone, which K/V shards travel how far
round the ring (``Layout.maxdist``) and which block pairs it computes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from dilexp.attention._kernels import heads_index
from dilexp.attention.improved import Piece
from dilexp.distributed import Ranges, ranges_len, shard_bounds
from dilexp.patterns.dilated import Branch

UnitMap = tuple[tuple[int, int, int], ...]

# -- analytic emptiness ----------------------------------------------------------------


def _first_selected(lo: int, hi: int, seg_start: int, r: int, o: int) -> int | None:
    """Smallest p in [lo, hi) with (p - seg_start) mod r == o; [lo, hi) lies in one segment."""
    t = lo - seg_start
    k = 0 if t <= o else -(-(t - o) // r)
    p = seg_start + o + k * r
    return p if p < hi else None


def _last_selected(lo: int, hi: int, seg_start: int, r: int, o: int) -> int | None:
    t = hi - 1 - seg_start
    if t < o:
        return None
    p = seg_start + o + ((t - o) // r) * r
    return p if p >= lo else None


def _segment_meets(a: tuple[int, int], b: tuple[int, int], s: int, br: Branch, causal: bool) -> bool:
    w, r, o = br.segment_length, br.dilation_rate, br.offset
    start, stop = s * w, (s + 1) * w
    q_hi = _last_selected(max(a[0], start), min(a[1], stop), start, r, o)
    k_lo = _first_selected(max(b[0], start), min(b[1], stop), start, r, o)
    if q_hi is None or k_lo is None:
        return False
    return k_lo <= q_hi if causal else True


def ranges_meet(q: tuple[int, int], k: tuple[int, int], br: Branch, causal: bool) -> bool:
    """Does ``br`` allow any (query in q, key in k)? O(1): only two segments need a look.

    Segments strictly between the first and the last segment both ranges touch lie inside
    both ranges, and a whole segment selects its position start + o in both (if o < w),
    so only the two end segments can be partial.
    """
    w = br.segment_length
    if br.offset >= w or q[1] <= q[0] or k[1] <= k[0]:
        return False
    s_lo = max(q[0] // w, k[0] // w)
    s_hi = min((q[1] - 1) // w, (k[1] - 1) // w)
    if s_lo > s_hi:
        return False
    if s_hi - s_lo >= 2:
        return True
    return _segment_meets(q, k, s_lo, br, causal) or _segment_meets(q, k, s_hi, br, causal)


def blocks_meet(q: Ranges, k: Ranges, branches: Sequence[Branch], causal: bool) -> bool:
    return any(ranges_meet(a, b, br, causal) for br in branches for a in q for b in k)


# -- layout: who holds what, what travels how far -------------------------------------


def unit_ranges(unit: UnitMap) -> Ranges:
    return tuple((g0, g1) for g0, g1, _ in unit)


def _pieces_of_shard(ranges: Ranges, chunks: int) -> list[UnitMap]:
    """Cut a shard's local index space [0, n) into ``chunks`` contiguous pieces (first ones longer)."""
    n = ranges_len(ranges)
    chunks = max(1, min(chunks, n))
    base, extra = divmod(n, chunks)
    spans, local = [], 0
    for g0, g1 in ranges:
        spans.append((g0, g1, local))
        local += g1 - g0
    out: list[UnitMap] = []
    lo = 0
    for i in range(chunks):
        hi = lo + base + (1 if i < extra else 0)
        triples = []
        for g0, g1, l0 in spans:
            a, b = max(lo, l0), min(hi, l0 + g1 - g0)
            if b > a:
                triples.append((g0 + a - l0, g0 + b - l0, a))
        out.append(tuple(triples))
        lo = hi
    return out


@dataclass(frozen=True)
class Layout:
    """Everything one rank needs to know about one call shape; identical maths on every rank.

    ``maxdist[j]``: how many hops shard j's K/V travel (0: nobody else needs it). At ring
    step t rank r holds shard (r - t) mod P iff t <= maxdist of that shard.
    ``pairs[j]``: this rank's non-empty (query unit, key unit) indices against shard j.
    """

    n: int
    world: int
    rank: int
    shards: tuple[Ranges, ...]
    q_units: tuple[UnitMap, ...]
    kv_units: tuple[tuple[UnitMap, ...], ...]
    maxdist: tuple[int, ...]
    pairs: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def local_len(self) -> int:
        return ranges_len(self.shards[self.rank])

    def shard_len(self, j: int) -> int:
        return ranges_len(self.shards[j])

    def holds(self, t: int, j: int) -> bool:
        return t <= self.maxdist[j]

    def pairs_per_step(self, j: int) -> int:
        return len(self.q_units) * len(self.kv_units[j])


@lru_cache(maxsize=256)
def make_layout(
    branches: tuple[Branch, ...],
    n: int,
    world: int,
    rank: int,
    chunks: int,
    placement: str,
    causal: bool,
) -> Layout:
    """The plan of one rank for a length-``n`` call (world 1: the single-process chunk ring).

    Single process: the "shards" are the ``chunks`` blocks laid out by ``placement`` and
    all live in one tensor, so local index == global position. Several processes: the
    shards are laid out by ``placement`` over the ranks and each is cut into ``chunks``
    contiguous sub-blocks of its local tensor, which only bounds the work per call.
    """
    if world == 1:
        bounds = shard_bounds(n, max(1, min(chunks, n)), placement)
        units = tuple(tuple((a, b, a) for a, b in rng) for rng in bounds if rng)
        pairs = tuple(
            (a, b)
            for a in range(len(units))
            for b in ((a - s) % len(units) for s in range(len(units)))
            if blocks_meet(unit_ranges(units[a]), unit_ranges(units[b]), branches, causal)
        )
        return Layout(n, 1, 0, (((0, n),),), units, (units,), (0,), (pairs,))

    shards = tuple(shard_bounds(n, world, placement))
    maxdist = []
    for j in range(world):
        far = 0
        for i in range(world):
            if i != j and blocks_meet(shards[i], shards[j], branches, causal):
                far = max(far, (i - j) % world)
        maxdist.append(far)
    pieces = tuple(tuple(_pieces_of_shard(s, chunks)) for s in shards)
    q_units = pieces[rank]
    pairs = []
    for j in range(world):
        needed = blocks_meet(shards[rank], shards[j], branches, causal)
        pairs.append(tuple(
            (a, b)
            for a in range(len(q_units))
            for b in range(len(pieces[j]))
            if needed and blocks_meet(unit_ranges(q_units[a]), unit_ranges(pieces[j][b]), branches, causal)
        ))
    return Layout(n, world, rank, shards, q_units, pieces, tuple(maxdist), tuple(pairs))


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
    first = _first_selected(lo, hi, seg_start, r, o)
    if first is None:
        return None
    last = _last_selected(lo, hi, seg_start, r, o)
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
    heads = heads_index(br.heads)
    if not isinstance(heads, slice):  # every layout of the dilated pattern gives a progression
        raise RuntimeError(f"ring: heads {br.heads} of a branch are not a strided range")
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
        return RingPlan(tuple(tuple(s) for s in steps), None, None)
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
    )
