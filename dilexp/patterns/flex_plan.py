"""The plans of ``flex``: FlexAttention BlockMasks of the dilated pattern and the token
permutation around them, built from closed-form block tables (see attention/flex.py for
the compact and natural layouts). Each plan has its own cache key (``flex_key``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch.nn.attention.flex_attention import BlockMask

from dilexp.patterns.dilated import DilatedPattern, segment_positions
from dilexp.patterns.strided import pattern_key

_BLOCK_TENSORS = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)


# mask_mod / score_mod factories. The mods only read tensors they close over, so every
# plan shares one traced graph (and one compiled kernel) whatever its sizes and offsets.
# They look segments up in per-slot tables instead of computing p // w and p % w: integer
# division per score entry made the natural-order path 4x slower on CPU.
def _compact_mods(seg_ids: torch.Tensor, causal: torch.Tensor) -> tuple[Callable, None]:
    """seg_ids (V, Np): run (segment) of each compact slot of each virtual head, -1 for padding."""

    def mask_mod(b, h, q_idx, kv_idx):
        s_q = seg_ids[h, q_idx]
        return (s_q == seg_ids[h, kv_idx]) & (s_q >= 0) & ((q_idx >= kv_idx) | ~causal)

    return mask_mod, None


def _natural_mods(
    seg_ids: torch.Tensor, log_count: torch.Tensor, causal: torch.Tensor
) -> tuple[Callable, Callable]:
    """seg_ids (m, H, Np): segment of each position for each pair and head, -1 if unselected."""
    num_pairs = seg_ids.shape[0]

    def count(h, q_idx, kv_idx):
        total = None
        for i in range(num_pairs):  # unrolled when traced: the pair count is fixed by the config
            s_q = seg_ids[i, h, q_idx]
            hit = (s_q == seg_ids[i, h, kv_idx]) & (s_q >= 0)
            total = hit.to(torch.int32) if total is None else total + hit.to(torch.int32)
        return total

    def mask_mod(b, h, q_idx, kv_idx):
        return (count(h, q_idx, kv_idx) > 0) & ((q_idx >= kv_idx) | ~causal)

    def score_mod(score, b, h, q_idx, kv_idx):
        # A key selected by c pairs counts c times (DESIGN section 3): + log c.
        return score + log_count[count(h, q_idx, kv_idx)]

    return mask_mod, score_mod


def _mods(kind: str, tensors: tuple[torch.Tensor, ...]) -> tuple[Callable, Callable | None]:
    return _natural_mods(*tensors) if kind == "natural" else _compact_mods(*tensors)


class FlexPlan:
    """A cached flex pattern: the BlockMask and the token permutation around it.

    ``perm`` (V, Np): token index of each compact slot of each virtual head (0 where the slot
    is padding); ``inv`` (V, N): compact slot of each token; ``sel`` (V, N): the token is
    selected by that virtual head; ``heads`` (V,): the real head of each virtual head. All
    four are None in "natural" mode. ``.to(device)`` also rebuilds the mods, whose closed-over
    tensors would otherwise stay behind on the device the plan was built on.
    """

    def __init__(
        self,
        kind: str,
        block_mask: BlockMask,
        mod_tensors: tuple[torch.Tensor, ...],
        perm: torch.Tensor | None = None,
        inv: torch.Tensor | None = None,
        sel: torch.Tensor | None = None,
        heads: torch.Tensor | None = None,
    ) -> None:
        self.kind = kind
        self.mod_tensors = mod_tensors
        mask_mod, self.score_mod = _mods(kind, mod_tensors)
        block_mask.mask_mod = mask_mod
        self.block_mask = block_mask
        self.perm, self.inv, self.sel, self.heads = perm, inv, sel, heads
        # Top-level references so the caches' byte counters see the BlockMask's tables too.
        for name in _BLOCK_TENSORS:
            setattr(self, f"bm_{name}", getattr(block_mask, name))

    def to(self, device: torch.device | str) -> FlexPlan:
        move = lambda t: None if t is None else t.to(device)
        return FlexPlan(
            self.kind, self.block_mask.to(device), tuple(t.to(device) for t in self.mod_tensors),
            move(self.perm), move(self.inv), move(self.sel), move(self.heads),
        )


def _block_tables(seg_id: torch.Tensor, num_segments: int, block_size: int, causal: bool) -> tuple[torch.Tensor, ...]:
    """Which block pairs are touched and which are full, from per-token segment ids.

    seg_id (V, Np): segment of each token for each virtual head, -1 where the token takes
    no part. A block pair is touched when some segment has tokens in both blocks, full when
    every token of both blocks lies in one and the same segment. Causal: a pair strictly
    below the diagonal keeps all its entries, a diagonal pair keeps at least q = k.
    Returns (any, full), each (V, nblk, nblk) bool.
    """
    v, npad = seg_id.shape
    nblk = npad // block_size
    occ = torch.zeros(v, nblk, num_segments + 1)
    blk = (torch.arange(npad) // block_size).expand(v, -1)
    occ[torch.arange(v)[:, None], blk, seg_id + 1] = 1.0
    occ = occ[:, :, 1:]  # column 0 collected the tokens without a segment
    touched = torch.bmm(occ, occ.transpose(1, 2)) > 0
    per_block = seg_id.view(v, nblk, block_size)
    lo, hi = per_block.min(dim=2).values, per_block.max(dim=2).values
    uniform = torch.where((lo == hi) & (lo >= 0), lo, -1)
    full = (uniform[:, :, None] == uniform[:, None, :]) & (uniform[:, :, None] >= 0)
    if causal:
        below = torch.ones(nblk, nblk, dtype=torch.bool)
        touched = touched & torch.tril(below)
        full = full & torch.tril(below, diagonal=-1)
    return touched, full


def _ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, indices) in BlockMask's format: the flagged key blocks of a row first, ascending."""
    nk = flags.shape[-1]
    key = (~flags).to(torch.int64) * nk + torch.arange(nk)
    idx = torch.sort(key, dim=-1).values % nk
    return flags.sum(dim=-1).to(torch.int32), idx.to(torch.int32)


def _block_mask(touched: torch.Tensor, full: torch.Tensor, npad: int, block_size: int) -> BlockMask:
    partial = touched & ~full
    kv_num, kv_idx = _ordered(partial.unsqueeze(0))
    full_num, full_idx = _ordered(full.unsqueeze(0))
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, seq_lengths=(npad, npad)
    )


def _virtual_heads(pattern: DilatedPattern, num_heads: int) -> list[tuple[int, int, int]]:
    """(w, r, o) of every virtual head, in virtual-head order.

    grouped: virtual head h is head h. all: virtual head i * H + h is pair i on head h,
    so the lse merge can view the outputs as (pairs, heads).
    """
    if pattern.heads == "grouped":
        out = [(0, 0, 0)] * num_heads
        for br in pattern.branches(num_heads):
            for h in br.heads:
                out[h] = (br.segment_length, br.dilation_rate, br.offset)
        return out
    return [
        (w, r, h % r)
        for w, r in zip(pattern.segment_lengths, pattern.dilation_rates, strict=True)
        for h in range(num_heads)
    ]


def build_compact_plan(
    pattern: DilatedPattern, num_heads: int, n: int, block_size: int, causal: bool, device: torch.device
) -> FlexPlan:
    """The compact-order plan ("compact" for grouped heads, "lse" for heads="all")."""
    npad = -(-n // block_size) * block_size
    vheads = _virtual_heads(pattern, num_heads)
    v = len(vheads)
    perm = torch.zeros(v, npad, dtype=torch.int64)
    inv = torch.zeros(v, n, dtype=torch.int64)
    sel = torch.zeros(v, n, dtype=torch.bool)
    seg_id = torch.full((v, npad), -1, dtype=torch.int64)
    num_segments = 1
    for j, (w, r, o) in enumerate(vheads):
        idx, ok = segment_positions(n, w, r, o)
        pos = idx[ok]  # row-major: segment by segment, ascending inside each
        m = pos.numel()
        # Every segment but the last holds the same number of selected positions.
        per_seg = max(int(ok[0].sum()), 1)
        perm[j, :m] = pos
        inv[j, pos] = torch.arange(m)
        sel[j, pos] = True
        seg_id[j, :m] = torch.arange(m) // per_seg
        num_segments = max(num_segments, idx.shape[0])
    touched, full = _block_tables(seg_id, num_segments, block_size, causal)
    block_mask = _block_mask(touched, full, npad, block_size)
    kind = "compact" if pattern.heads == "grouped" else "lse"
    heads = torch.tensor([j % num_heads for j in range(v)], dtype=torch.int64)
    mods = (seg_id.to(torch.int32), torch.tensor(causal))
    return FlexPlan(kind, block_mask, mods, perm, inv, sel, heads).to(device)


def build_natural_plan(
    pattern: DilatedPattern, num_heads: int, n: int, block_size: int, causal: bool, device: torch.device
) -> FlexPlan:
    """heads="all" in natural token order, multiplicities through a score_mod."""
    npad = -(-n // block_size) * block_size
    pos = torch.arange(npad)
    touched = torch.zeros(num_heads, npad // block_size, npad // block_size, dtype=torch.bool)
    full = torch.zeros_like(touched)
    seg_ids = torch.full((pattern.num_pairs, num_heads, npad), -1, dtype=torch.int32)
    for i, (w, r) in enumerate(zip(pattern.segment_lengths, pattern.dilation_rates, strict=True)):
        w = min(w, n)
        o = torch.arange(num_heads) % r
        chosen = ((pos % w) % r == o[:, None]) & (pos < n)
        seg_id = torch.where(chosen, pos // w, -1)
        seg_ids[i] = seg_id.to(torch.int32)
        t, f = _block_tables(seg_id, -(-n // w), block_size, causal)
        touched |= t
        full |= f
    block_mask = _block_mask(touched, full, npad, block_size)
    log_count = torch.log(torch.arange(pattern.num_pairs + 1, dtype=torch.float32))
    mods = (seg_ids, log_count, torch.tensor(causal))
    return FlexPlan("natural", block_mask, mods).to(device)


def flex_key(pattern: DilatedPattern, num_heads: int, n: int, block_size: int, mode: str,
             causal: bool) -> tuple[Hashable, ...]:
    """The cache key of the ``mode`` plan ("compact", "lse" or "natural") for length ``n``."""
    return ("flex", mode, n, *pattern_key(pattern, num_heads), block_size, bool(causal))


def build_flex_plan(pattern: DilatedPattern, num_heads: int, n: int, block_size: int, mode: str, causal: bool,
                    device: torch.device) -> FlexPlan:
    build = build_natural_plan if mode == "natural" else build_compact_plan
    return build(pattern, num_heads, n, block_size, causal, device)

