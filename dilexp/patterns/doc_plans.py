"""Per-layout plans of the dilated pattern over packed documents (issue 18).

With a ``DocumentLayout`` every document is its own sequence: a branch (w, r, o) cuts each
document into segments [start + s*w, start + (s+1)*w) (the last one cut at the document's
end) and selects the positions o, o + r, ... of each. Segments no longer sit at one stride
of the row, so no strided view covers them; instead one index plan per branch gathers the
selected positions of *every* segment of *every* document of *every* row, with the batch
rows flattened into one (B * N) axis, into a padded (segments, slots) batch. No Python loop
over documents runs on the hot path: a call makes one cache lookup (keyed by the layout)
and one gather per (branch, bucket).

Buckets. ``dilated`` pads every segment to the branch's longest one (its one-bucket
baseline, with a padding mask, as its last short segment is without documents).
``improved`` groups segments by slot count: full segments of every document share one exact
bucket (no padding, no mask), the shorter ones (a document's last segment, short
documents) go to power-of-two buckets, padded at the end. Padding at the end needs no mask
under a causal mask: a real query never sees a later slot. Without it the padded keys are
masked.

``segment_table`` is the vectorised description of the segments both plans (and the ring's,
``doc_ring``) are cut from.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

import torch

from dilexp.patterns.dilated import Branch, DilatedPattern
from dilexp.patterns.documents import DocumentLayout
from dilexp.patterns.gather import segment_mask
from dilexp.patterns.strided import pattern_key


def document_starts(docs: DocumentLayout) -> torch.Tensor:
    """(B, N) int64: the start offset of the document each position belongs to."""
    rows = [b for b, starts in enumerate(docs.rows) for _ in starts]
    cols = [s for starts in docs.rows for s in starts]
    marks = torch.zeros(docs.batch, docs.n, dtype=torch.int64)
    marks[rows, cols] = torch.tensor(cols, dtype=torch.int64)
    # Each start is >= every earlier start of its row, so a running max carries it forward.
    return marks.cummax(dim=1).values


class SegmentTable(NamedTuple):
    """The selected positions of one branch over a layout, sorted by flat position.

    flat (M,): b * N + p of every selected position; seg (M,): its segment (0..S-1, only
    segments with a selected position count, numbered in flat order); slot (M,): its index
    inside the segment; count (S,): selected positions per segment; first (S,): the table row
    of each segment's first position (segments are contiguous runs of the table).
    """

    flat: torch.Tensor
    seg: torch.Tensor
    slot: torch.Tensor
    count: torch.Tensor
    first: torch.Tensor


def segment_table(docs: DocumentLayout, w: int, r: int, o: int) -> SegmentTable:
    within = (torch.arange(docs.n) - document_starts(docs)) % w  # offset inside the segment
    selected = (within % r) == o
    # A new segment starts at every multiple of w inside a document (a document start included).
    seg_all = torch.cumsum((within == 0).reshape(-1), 0) - 1
    flat = selected.reshape(-1).nonzero().squeeze(1)
    _, seg, count = torch.unique_consecutive(seg_all[flat], return_inverse=True, return_counts=True)
    slot = within.reshape(-1)[flat] // r
    first = torch.cumsum(count, 0) - count
    return SegmentTable(flat, seg, slot, count, first)


def padded_slots(table: SegmentTable, segs: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (S', slots) flat positions, valid (S', slots)) of segments ``segs``; padding -> 0."""
    j = torch.arange(slots)
    valid = j.unsqueeze(0) < table.count[segs].unsqueeze(1)
    src = (table.first[segs].unsqueeze(1) + j.unsqueeze(0)).clamp(max=max(len(table.flat) - 1, 0))
    idx = torch.where(valid, table.flat[src], torch.zeros_like(src))
    return idx, valid


class DocBucket(NamedTuple):
    """One batched call: idx (S, L) flat positions (padding -> 0); pos/keep (P,) where the real
    slots go back to; mask: None (no padding, or causal with padding at the end), else bool
    broadcastable to (S, 1, L, L)."""

    idx: torch.Tensor
    pos: torch.Tensor
    keep: torch.Tensor
    mask: torch.Tensor | None


def _bucket_sizes(count: torch.Tensor, bucketed: bool) -> torch.Tensor:
    top = int(count.max())
    if not bucketed:
        return torch.full_like(count, top)
    pow2 = torch.pow(2, torch.ceil(torch.log2(count.double())).long())
    return torch.where(count == top, top, pow2.clamp(max=top))


def branch_buckets(docs: DocumentLayout, b: Branch, causal: bool, bucketed: bool) -> tuple[DocBucket, ...]:
    table = segment_table(docs, b.segment_length, b.dilation_rate, b.offset)
    if len(table.count) == 0:
        return ()
    sizes = _bucket_sizes(table.count, bucketed)
    out = []
    for size in sorted(set(sizes.tolist()), reverse=True):
        segs = (sizes == size).nonzero().squeeze(1)
        idx, valid = padded_slots(table, segs, size)
        keep = valid.reshape(-1).nonzero().squeeze(1)
        pos = idx.reshape(-1)[keep]
        if not bucketed:
            mask: torch.Tensor | None = segment_mask(valid, causal)  # dilated: always its padded-batch mask
        elif causal or bool(valid.all()):
            mask = None
        else:
            mask = valid[:, None, None, :].contiguous()  # hide the padded keys
        out.append(DocBucket(idx, pos, keep, mask))
    return tuple(out)


def build_doc_plan(pattern: DilatedPattern, docs: DocumentLayout, num_heads: int, causal: bool,
                   bucketed: bool) -> tuple[tuple, ...]:
    """Per branch: (heads (Hb,) int64, buckets), as plain tuples (the cache moves tuples of
    tensors; ``DocBucket(*bucket)`` names them again)."""
    return tuple(
        (torch.tensor(b.heads, dtype=torch.int64), tuple(tuple(x) for x in branch_buckets(docs, b, causal, bucketed)))
        for b in pattern.branches(num_heads)
    )


def doc_plan_key(pattern: DilatedPattern, docs: DocumentLayout, num_heads: int, causal: bool,
                 bucketed: bool) -> tuple[Hashable, ...]:
    """The cache key of ``build_doc_plan``: the layout's own key, so equal layouts share a plan."""
    return ("dilated_docs", *pattern_key(pattern, num_heads), docs.key, bool(causal), bool(bucketed))
