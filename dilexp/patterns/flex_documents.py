"""flex plans for packed documents (issue 18): one BlockMask per layout, with a batch row per
batch row, cached under the layout's key so a step builds it once for all layers.

Each document is its own sequence: its segments restart at its start, with the segment length
clamped to the document's length exactly as the per-length plans clamp it to N. Segment ids are
numbered across the documents of a row, so "same segment" already implies "same document": the
mask_mod's segment equality *is* the AND with document equality, and the block tables skip every
block pair no document connects. The token permutation of the compact order is per row.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch.nn.attention.flex_attention import BlockMask

from dilexp.patterns.dilated import DilatedPattern, segment_positions
from dilexp.patterns.documents import DocumentLayout
from dilexp.patterns.flex_plan import FlexPlan, _block_tables, _ordered, _virtual_heads
from dilexp.patterns.strided import pattern_key


def _compact_doc_mods(seg_ids: torch.Tensor, causal: torch.Tensor) -> tuple[Callable, None]:
    """seg_ids (B, V, Np): segment (numbered across the row's documents) of each compact slot."""

    def mask_mod(b, h, q_idx, kv_idx):
        s_q = seg_ids[b, h, q_idx]
        return (s_q == seg_ids[b, h, kv_idx]) & (s_q >= 0) & ((q_idx >= kv_idx) | ~causal)

    return mask_mod, None


def _natural_doc_mods(seg_ids: torch.Tensor, log_count: torch.Tensor, causal: torch.Tensor
                      ) -> tuple[Callable, Callable]:
    """seg_ids (m, B, H, Np): segment of each position per pair, row and head; -1 unselected."""
    num_pairs = seg_ids.shape[0]

    def count(b, h, q_idx, kv_idx):
        total = None
        for i in range(num_pairs):
            s_q = seg_ids[i, b, h, q_idx]
            hit = ((s_q == seg_ids[i, b, h, kv_idx]) & (s_q >= 0)).to(torch.int32)
            total = hit if total is None else total + hit
        return total

    def mask_mod(b, h, q_idx, kv_idx):
        return (count(b, h, q_idx, kv_idx) > 0) & ((q_idx >= kv_idx) | ~causal)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + log_count[count(b, h, q_idx, kv_idx)]

    return mask_mod, score_mod


class DocumentFlexPlan(FlexPlan):
    """A ``FlexPlan`` whose tables carry a batch dimension: ``perm`` (B, V, Np), ``inv`` and
    ``sel`` (B, V, N), and a BlockMask with B rows."""

    def __init__(self, kind: str, block_mask: BlockMask, mod_tensors: tuple[torch.Tensor, ...],
                 perm: torch.Tensor | None = None, inv: torch.Tensor | None = None,
                 sel: torch.Tensor | None = None, heads: torch.Tensor | None = None) -> None:
        super().__init__(kind, block_mask, mod_tensors, perm, inv, sel, heads)
        mods = _natural_doc_mods if kind == "natural" else _compact_doc_mods
        mask_mod, self.score_mod = mods(*mod_tensors)
        self.block_mask.mask_mod = mask_mod

    def to(self, device: torch.device | str) -> DocumentFlexPlan:
        move = lambda t: None if t is None else t.to(device)
        return DocumentFlexPlan(self.kind, self.block_mask.to(device), tuple(t.to(device) for t in self.mod_tensors),
                                move(self.perm), move(self.inv), move(self.sel), move(self.heads))


def _batched_block_mask(touched: torch.Tensor, full: torch.Tensor, npad: int, block_size: int) -> BlockMask:
    """touched / full: (B, V, nblk, nblk)."""
    kv_num, kv_idx = _ordered(touched & ~full)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                   seq_lengths=(npad, npad))


def _tables(seg_id: torch.Tensor, num_segments: int, block_size: int, causal: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``_block_tables`` over (B, V, Np) ids: (touched, full), each (B, V, nblk, nblk)."""
    b, v, npad = seg_id.shape
    touched, full = _block_tables(seg_id.reshape(b * v, npad), num_segments, block_size, causal)
    nblk = npad // block_size
    return touched.view(b, v, nblk, nblk), full.view(b, v, nblk, nblk)


def build_document_compact_plan(pattern: DilatedPattern, num_heads: int, layout: DocumentLayout, block_size: int,
                                causal: bool, device: torch.device) -> DocumentFlexPlan:
    """The compact order per row: each document's selected positions, segment by segment."""
    n, rows = layout.n, layout.batch
    npad = -(-n // block_size) * block_size
    vheads = _virtual_heads(pattern, num_heads)
    v = len(vheads)
    perm = torch.zeros(rows, v, npad, dtype=torch.int64)
    inv = torch.zeros(rows, v, n, dtype=torch.int64)
    sel = torch.zeros(rows, v, n, dtype=torch.bool)
    seg_id = torch.full((rows, v, npad), -1, dtype=torch.int64)
    num_segments = 1
    for b in range(rows):
        for j, (w, r, o) in enumerate(vheads):
            pos, seg, first = [], [], 0
            for start, stop in layout.spans(b):
                idx, ok = segment_positions(stop - start, w, r, o)
                pos.append(idx[ok] + start)  # row-major: segment by segment, ascending inside each
                seg.append(torch.arange(idx.shape[0])[:, None].expand_as(idx)[ok] + first)
                first += idx.shape[0]
            p, s = torch.cat(pos), torch.cat(seg)
            m = p.numel()
            perm[b, j, :m], seg_id[b, j, :m] = p, s
            inv[b, j, p] = torch.arange(m)
            sel[b, j, p] = True
            num_segments = max(num_segments, first)
    touched, full = _tables(seg_id, num_segments, block_size, causal)
    kind = "compact" if pattern.heads == "grouped" else "lse"
    heads = torch.tensor([j % num_heads for j in range(v)], dtype=torch.int64)
    mods = (seg_id.to(torch.int32), torch.tensor(causal))
    return DocumentFlexPlan(kind, _batched_block_mask(touched, full, npad, block_size), mods,
                            perm, inv, sel, heads).to(device)


def build_document_natural_plan(pattern: DilatedPattern, num_heads: int, layout: DocumentLayout, block_size: int,
                                causal: bool, device: torch.device) -> DocumentFlexPlan:
    """heads="all" in natural token order: per pair, row and head, each position's segment."""
    n, rows = layout.n, layout.batch
    npad = -(-n // block_size) * block_size
    nblk = npad // block_size
    seg_ids = torch.full((pattern.num_pairs, rows, num_heads, npad), -1, dtype=torch.int32)
    touched = torch.zeros(rows, num_heads, nblk, nblk, dtype=torch.bool)
    full = torch.zeros_like(touched)
    offsets = torch.arange(num_heads)
    for i, (w, r) in enumerate(zip(pattern.segment_lengths, pattern.dilation_rates, strict=True)):
        num_segments = 1
        for b in range(rows):
            first = 0
            for start, stop in layout.spans(b):
                length = stop - start
                wl = min(w, length)  # as the per-length plan clamps w to N
                p = torch.arange(length)
                chosen = (p % wl) % r == (offsets % r)[:, None]
                seg_ids[i, b, :, start:stop] = torch.where(chosen, p // wl + first, -1).to(torch.int32)
                first += -(-length // wl)
            num_segments = max(num_segments, first)
        t, f = _tables(seg_ids[i].to(torch.int64), num_segments, block_size, causal)
        touched |= t
        full |= f
    log_count = torch.log(torch.arange(pattern.num_pairs + 1, dtype=torch.float32))
    mods = (seg_ids, log_count, torch.tensor(causal))
    return DocumentFlexPlan("natural", _batched_block_mask(touched, full, npad, block_size), mods).to(device)


def document_flex_key(pattern: DilatedPattern, num_heads: int, layout: DocumentLayout, block_size: int, mode: str,
                      causal: bool) -> tuple[Hashable, ...]:
    return ("flex_docs", mode, layout.key, *pattern_key(pattern, num_heads), block_size, bool(causal))


def build_document_flex_plan(pattern: DilatedPattern, num_heads: int, layout: DocumentLayout, block_size: int,
                             mode: str, causal: bool, device: torch.device) -> DocumentFlexPlan:
    build = build_document_natural_plan if mode == "natural" else build_document_compact_plan
    return build(pattern, num_heads, layout, block_size, causal, device)
