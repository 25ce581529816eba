"""Who holds what in a ring call, and what travels how far, decided from the dilated pattern alone.

Vocabulary:
- a *block* is a set of sequence positions handled as one unit: a rank's shard, or a
  sub-chunk of it (``chunks``). It is described by a ``UnitMap``: a tuple of
  ``(global_start, global_stop, local_start)`` triples, i.e. which global positions it
  holds and where they sit in the tensor that holds them;
- a *block pair* (query block, key block) is the unit of work. Its pattern is a tuple of
  ``BlockOp``s, one fused attention call each on strided views of the blocks
  (``ring_ops.build_block_pattern``); a pair with no allowed entry is skipped. A call's
  ops over all its pairs form a ``ring_ops.RingPlan``, the object the pattern cache stores.

Emptiness is decided analytically (``ranges_meet``) for every pair of shards, so each rank
knows, without building anything or talking to anyone, which K/V shards travel how far
round the ring (``Layout.maxdist``) and which block pairs it computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from dilexp.distributed import Ranges, ranges_len, shard_bounds
from dilexp.patterns.dilated import Branch

UnitMap = tuple[tuple[int, int, int], ...]

# -- analytic emptiness ----------------------------------------------------------------


def first_selected(lo: int, hi: int, seg_start: int, r: int, o: int) -> int | None:
    """Smallest p in [lo, hi) with (p - seg_start) mod r == o; [lo, hi) lies in one segment."""
    t = lo - seg_start
    k = 0 if t <= o else -(-(t - o) // r)
    p = seg_start + o + k * r
    return p if p < hi else None


def last_selected(lo: int, hi: int, seg_start: int, r: int, o: int) -> int | None:
    t = hi - 1 - seg_start
    if t < o:
        return None
    p = seg_start + o + ((t - o) // r) * r
    return p if p >= lo else None


def _segment_meets(a: tuple[int, int], b: tuple[int, int], s: int, br: Branch, causal: bool) -> bool:
    w, r, o = br.segment_length, br.dilation_rate, br.offset
    start, stop = s * w, (s + 1) * w
    q_hi = last_selected(max(a[0], start), min(a[1], stop), start, r, o)
    k_lo = first_selected(max(b[0], start), min(b[1], stop), start, r, o)
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
