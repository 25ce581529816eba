"""The ring's per-layout plan over packed documents (issue 18): which block pairs any document
connects, and one batched op per (block pair, branch) covering every document.

Documents restart the dilated pattern, so segments sit wherever documents put them and a
document may span blocks (chunks of the single-process ring, or shards of several ranks).
Instead of strided spans (``ring_ops``), an op here gathers by index: for the (query block,
key block) pair and one branch, every segment — of every document of every row — with
selected positions in both blocks becomes one row of a padded batch: its query slots from
the query block, its key slots from the key block, and a mask (padding, and under a causal
mask key position <= query position). The number of ops does not grow with the number of
documents.

Which pairs run is decided from the same segment tables (``doc_plans.segment_table``): a
pair is kept iff some segment has a selected query in the one block and an allowed
selected key in the other; a shard travels only as far as the farthest rank that needs it.
Everything here depends on the layout, so it is one cache entry (``DocRingPlan``) keyed by
the layout: one build per step for all layers.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dilexp.distributed import shard_bounds
from dilexp.patterns.dilated import Branch, DilatedPattern
from dilexp.patterns.doc_plans import SegmentTable, segment_table
from dilexp.patterns.documents import DocumentLayout
from dilexp.patterns.ring_layout import Layout, UnitMap, _pieces_of_shard
from dilexp.patterns.ring_ops import HeadRange, RingPlan
from dilexp.patterns.strided import heads_slice, pattern_key


@dataclass(frozen=True, eq=False)
class DocOp:
    """One batched call of one branch between a query block and a key block.

    q_idx (S*Lq,) / k_idx (S*Lk,): flat (row * block tensor length + local) indices of each
    slot in the tensors holding the blocks (padding -> 0); hidden (S, 1, Lq, Lk) the entries
    that are *not* allowed (stored inverted: the kernel fills them, and a call should not
    invert it again); q_keep (P,) the real query slots of the flattened batch
    and q_pos (P,) where they sit (distinct: a position is in one segment of a branch).
    """

    head_range: HeadRange
    segs: int
    lq: int
    lk: int
    q_idx: torch.Tensor
    k_idx: torch.Tensor
    q_keep: torch.Tensor
    q_pos: torch.Tensor
    hidden: torch.Tensor

    @property
    def heads(self) -> slice:
        return slice(*self.head_range)

    def to(self, device: torch.device | str) -> DocOp:
        return DocOp(self.head_range, self.segs, self.lq, self.lk,
                     *(t.to(device) for t in (self.q_idx, self.k_idx, self.q_keep, self.q_pos, self.hidden)))


@dataclass(frozen=True, eq=False)
class DocRingPlan:
    """The layout (pairs, maxdist) and the ops of one rank's call over one document layout."""

    layout: Layout
    plan: RingPlan

    def to(self, device: torch.device | str) -> DocRingPlan:
        steps = tuple(tuple(op.to(device) for op in step) for step in self.plan.steps)
        return DocRingPlan(self.layout, RingPlan(steps, None, None, ()))


class _Entries(NamedTuple):
    """A block's share of one branch's segment table: seg (M,), global position (M,), flat
    local index (M,), sorted by segment then position."""

    seg: torch.Tensor
    gpos: torch.Tensor
    local: torch.Tensor


def _entries(table: SegmentTable, unit: UnitMap, n: int, held: int) -> _Entries:
    """The selected positions inside ``unit`` (a block held in a tensor of ``held`` positions)."""
    row, gpos = table.flat // n, table.flat % n
    local = torch.full_like(gpos, -1)
    for g0, g1, l0 in unit:
        inside = (gpos >= g0) & (gpos < g1)
        local = torch.where(inside, l0 + gpos - g0, local)
    keep = local >= 0
    return _Entries(table.seg[keep], gpos[keep], row[keep] * held + local[keep])


def _reach(e: _Entries, segs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latest query position, earliest key position) of each segment inside the block
    (-1 / n_max where the block has none): the pair test is a comparison of the two."""
    big = torch.iinfo(torch.int64).max
    latest = torch.full((segs,), -1, dtype=torch.int64).scatter_reduce(0, e.seg, e.gpos, "amax")
    earliest = torch.full((segs,), big, dtype=torch.int64).scatter_reduce(0, e.seg, e.gpos, "amin")
    return latest, earliest


def _meets(qr: tuple[torch.Tensor, torch.Tensor], kr: tuple[torch.Tensor, torch.Tensor], causal: bool) -> bool:
    q_latest, k_earliest = qr[0], kr[1]
    if causal:
        return bool((q_latest >= k_earliest).any())
    return bool(((q_latest >= 0) & (k_earliest < torch.iinfo(torch.int64).max)).any())


def _padded(e: _Entries, common: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """(idx, global positions, valid), each (len(common), L): the block's slots of each segment
    (``member``: a table over all segment ids, True for those in ``common``)."""
    m = member[e.seg]
    seg, gpos, local = e.seg[m], e.gpos[m], e.local[m]
    row = torch.searchsorted(common, seg)
    slot = torch.arange(len(seg)) - torch.searchsorted(seg, seg)
    width = int(slot.max()) + 1 if len(slot) else 1
    idx = torch.zeros(len(common), width, dtype=torch.int64)
    pos = torch.full((len(common), width), -1, dtype=torch.int64)
    valid = torch.zeros(len(common), width, dtype=torch.bool)
    idx[row, slot], pos[row, slot], valid[row, slot] = local, gpos, True
    return idx, pos, valid


def _op(head_range: HeadRange, qe: _Entries, ke: _Entries, causal: bool, total: int) -> DocOp | None:
    """``total``: segments of the branch; ids index tables instead of set operations (isin)."""
    in_q = torch.zeros(total, dtype=torch.bool)
    in_q[qe.seg] = True
    member = torch.zeros(total, dtype=torch.bool)
    member[ke.seg] = True
    member &= in_q
    common = member.nonzero().squeeze(1)
    if len(common) == 0:
        return None
    qi, qp, qv = _padded(qe, common, member)
    ki, kp, kv = _padded(ke, common, member)
    mask = qv.unsqueeze(2) & kv.unsqueeze(1)
    if causal:
        mask &= kp.unsqueeze(1) <= qp.unsqueeze(2)
    live = mask.flatten(1).any(1)  # segments whose every entry the causal mask hides
    if not bool(live.any()):
        return None
    if not bool(live.all()):
        qi, qv, ki, mask = qi[live], qv[live], ki[live], mask[live]
    q_keep = qv.reshape(-1).nonzero().squeeze(1)
    return DocOp(head_range, qi.shape[0], qi.shape[1], ki.shape[1], qi.reshape(-1).contiguous(),
                 ki.reshape(-1).contiguous(), q_keep, qi.reshape(-1)[q_keep], (~mask).unsqueeze(1).contiguous())


def _head_range(br: Branch) -> HeadRange:
    heads = heads_slice(br.heads, "ring")
    return heads.start, heads.stop, heads.step or 1


def build_doc_ring(branches: Sequence[Branch], docs: DocumentLayout, world: int, rank: int, chunks: int,
                   placement: str, causal: bool) -> DocRingPlan:
    """This rank's layout and ops for a call over ``docs`` (world 1: the single-process chunk ring)."""
    n = docs.n
    tables = [segment_table(docs, br.segment_length, br.dilation_rate, br.offset) for br in branches]
    sizes = [len(t.count) for t in tables]
    if world == 1:
        bounds = shard_bounds(n, max(1, min(chunks, n)), placement)
        units = tuple(tuple((a, b, a) for a, b in rng) for rng in bounds if rng)
        shards: tuple = (((0, n),),)
        pieces: tuple = (units,)
        held = [n]
        maxdist: tuple[int, ...] = (0,)
    else:
        shards = tuple(shard_bounds(n, world, placement))
        pieces = tuple(tuple(_pieces_of_shard(s, chunks)) for s in shards)
        held = [sum(b - a for a, b in s) for s in shards]
        whole = []
        for s in shards:
            local, trip = 0, []
            for a, b in s:
                trip.append((a, b, local))
                local += b - a
            whole.append(tuple(trip))
        reach = [[_reach(_entries(t, whole[j], n, held[j]), sz) for t, sz in zip(tables, sizes, strict=True)]
                 for j in range(world)]
        far = []
        for j in range(world):
            need = [(i - j) % world for i in range(world)
                    if i != j and any(_meets(reach[i][b], reach[j][b], causal) for b in range(len(branches)))]
            far.append(max(need, default=0))
        maxdist = tuple(far)
    q_units = pieces[rank] if world > 1 else pieces[0]
    q_held = held[rank] if world > 1 else n
    # Each block's share of every branch's table, once (not once per pair).
    q_ent = [[_entries(t, qu, n, q_held) for t in tables] for qu in q_units]
    k_ent = [[[_entries(t, ku, n, held[j]) for t in tables] for ku in k_units] for j, k_units in enumerate(pieces)]
    heads = [_head_range(br) for br in branches]
    steps, pairs = [], []
    for j, k_units in enumerate(pieces):
        ops: list[DocOp] = []
        kept: list[tuple[int, int]] = []
        for a in range(len(q_units)):
            # Single process: key blocks in ring order from the query block, as ``make_layout``.
            order = [(a - s) % len(k_units) for s in range(len(k_units))] if world == 1 else range(len(k_units))
            for b in order:
                pair_ops = [op for h, qe, ke, sz in zip(heads, q_ent[a], k_ent[j][b], sizes, strict=True)
                            if (op := _op(h, qe, ke, causal, sz)) is not None]
                if pair_ops:
                    kept.append((a, b))
                    ops.extend(pair_ops)
        steps.append(tuple(ops))
        pairs.append(tuple(kept))
    layout = Layout(n, world, rank, shards, q_units, pieces, maxdist, tuple(pairs))
    return DocRingPlan(layout, RingPlan(tuple(steps), None, None, ()))


def doc_ring_key(pattern: DilatedPattern, num_heads: int, docs: DocumentLayout, world: int, rank: int, chunks: int,
                 placement: str, causal: bool) -> tuple[Hashable, ...]:
    """The cache key of ``build_doc_ring``: the layout's key with the call shape."""
    return ("ring_docs", pattern_key(pattern, num_heads), docs.key, world, rank, chunks, placement, bool(causal))
