"""``flex``: the dilated pattern through ``torch.nn.attention.flex_attention``.

Layout. A mask_mod of the dilated pattern on the natural token order makes every visited
block partial: inside a segment a (w, r, o) head keeps one query in r and one key in r, so
each block pair does r^2 times the useful work and evaluates the mask on every entry.
Instead, each head's tokens are permuted so that the positions its (segment, offset) class
selects are contiguous ("compact" order: segment 0's selected positions, then segment 1's,
...). In that order the pattern is plain block-diagonal attention over runs of
L = |selected positions of a segment| tokens: blocks are full (or partial only where a run
boundary cuts a block), the kernel skips everything off the diagonal, and the work is the
useful work. Heads of different branches get different permutations, so the flex call is
over "virtual heads" with one BlockMask row per virtual head: one compiled kernel, one call.

heads="all": each head is every (w_i, r_i) pair, so it becomes m virtual heads in compact
order whose outputs are merged by their log-sum-exps ("lse" mode). Compiled flex on CPU
cannot return the lse (torch 2.13), so there the union is computed in one call over the
natural order with a score_mod adding log(multiplicity) ("natural" mode): exact, but every
block on the largest segment's diagonal is visited, nearly all of them partial, so it is
slow (N = 4096, H = 8, segments [1024, 2048, 4096], rates [1, 2, 4]: about 2.5x slower than
sdpa on CPU) and warns once. Measured for one (2048, 4) pair at N = 4096: the natural order
visits 16x the useful entries and runs about 8x slower than the compact order.

BlockMasks are built from closed-form block tables (``BlockMask.from_kv_blocks``), not by
evaluating the mask_mod on all N x N entries (``create_block_mask`` takes seconds and GBs at
N = 4096), and are held in the pattern cache inside a ``FlexPlan``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from dilexp.attention._kernels import check_dims
from dilexp.attention.base import Attention, Capabilities
from dilexp.attention.registry import register
from dilexp.cache.base import PatternCache
from dilexp.errors import ConfigError
from dilexp.memory.base import MemoryPool
from dilexp.patterns.dilated import DilatedPattern, segment_positions

MODES = ("compact", "lse", "natural")
_BLOCK_TENSORS = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)


@functools.lru_cache(maxsize=1)
def compiled_flex() -> Callable[..., object]:
    """One compiled flex_attention per process, so every module shares its compiled kernels."""
    # dynamic=False: on CPU the dynamic-shape recompile for a second N emits invalid C++ (torch 2.13).
    return torch.compile(flex_attention, dynamic=False)


def no_cpu_backward_message() -> str:
    return (
        f"flex attention has no backward on CPU in torch {torch.__version__}; "
        "use attention=improved for training on CPU, or run on CUDA"
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


@register("flex")
class FlexDilatedAttention(Attention):
    """The LongNet dilated pattern (DESIGN section 3) through FlexAttention."""

    # "compiled" is what runs; "eager" is torch's uncompiled flex_attention on the same plan
    # (same BlockMask, permutation and merge), which lets the conformance suite draw many
    # shapes without a ~20 s compile each. Compiled flex is checked on fixed shapes.
    capabilities = Capabilities(
        pattern="dilated", head_layouts=("grouped", "all"), no_backward_on=("cpu",),
        paths=("compiled", "eager"), slow_paths=("compiled",), settings={"block_size": (16, 32)},
    )

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        cache: PatternCache | None = None,
        pool: MemoryPool | None = None,
        segment_lengths: Sequence[int] = (64, 128, 256),
        dilation_rates: Sequence[int] = (1, 2, 4),
        offsets: str = "head",
        heads: str = "grouped",
        block_size: int = 64,
    ) -> None:
        check_dims(num_heads, head_dim)
        self.pattern = DilatedPattern.from_config(segment_lengths, dilation_rates, offsets, heads)
        self.pattern.check_heads(num_heads)
        # The flex kernels tile a BlockMask block by multiples of 16 rows.
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size % 16:
            raise ConfigError("attention.block_size", block_size, "must be a positive multiple of 16")
        self.block_size = block_size
        super().__init__(num_heads, head_dim, cache=cache, pool=pool)
        # Test seams: another flex callable (e.g. eager flex_attention, which returns the lse
        # on CPU), and forcing the lse merge for heads="all" where it would not be chosen.
        self._kernel: Callable[..., object] | None = None
        self._lse_merge: bool | None = None

    def use_path(self, path: str) -> None:
        super().use_path(path)
        self._kernel = flex_attention if path == "eager" else None

    def mode(self, device: torch.device | str) -> str:
        """Which layout a call on ``device`` uses: "compact", "lse" or "natural" (see module doc)."""
        if self.pattern.heads == "grouped":
            return "compact"
        use_lse = self._lse_merge if self._lse_merge is not None else torch.device(device).type == "cuda"
        return "lse" if use_lse else "natural"

    def plan(self, n: int, causal: bool, device: torch.device | str) -> FlexPlan:
        """The cached FlexPlan (BlockMask and permutation) for length ``n`` on ``device``."""
        p, mode = self.pattern, self.mode(device)
        key = ("flex", mode, n, p.segment_lengths, p.dilation_rates, p.offsets, p.heads,
               self.num_heads, self.block_size, causal)
        build = build_natural_plan if mode == "natural" else build_compact_plan
        if mode == "natural":
            # Python shows this once per process: it explains a slow run, it is not an error.
            warnings.warn(
                f"flex heads='all' on {torch.device(device).type}: compiled flex cannot return the "
                f"log-sum-exp here (torch {torch.__version__}), so the pairs run in natural token order "
                "with partial blocks; exact but slow. Use attention=improved for speed.",
                stacklevel=2,
            )
        dev = torch.device(device)
        return self.cache.get_or_build(
            key, lambda: build(p, self.num_heads, n, self.block_size, causal, dev), device
        )

    def prepare(self, n: int, device: torch.device | str, causal: bool | None = None) -> None:
        for c in (False, True) if causal is None else (causal,):
            self.plan(n, c, device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        self._check_input(q, k, v)
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise NotImplementedError(no_cpu_backward_message())
        b, n, h, d = q.shape
        plan = self.plan(n, causal, q.device)
        kernel = self._kernel if self._kernel is not None else compiled_flex()
        scale = 1.0 / math.sqrt(d)
        npad = plan.block_mask.seq_lengths[0]
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views

        if plan.kind == "natural":
            if npad != n:
                qt, kt, vt = (F.pad(t, (0, 0, 0, npad - n)) for t in (qt, kt, vt))
            out = kernel(qt, kt, vt, score_mod=plan.score_mod, block_mask=plan.block_mask, scale=scale)
            return out[:, :, :n].transpose(1, 2)

        # Compact order: slot s of virtual head j holds token perm[j, s] of head heads[j].
        idx = (slice(None), plan.heads[:, None], plan.perm)
        qv, kv, vv = qt[idx], kt[idx], vt[idx]
        if plan.kind == "lse":
            o, aux = kernel(qv, kv, vv, block_mask=plan.block_mask, scale=scale, return_aux=AuxRequest(lse=True))
            lse = aux.lse
        else:
            o = kernel(qv, kv, vv, block_mask=plan.block_mask, scale=scale)
        nv = plan.inv.shape[0]
        back = plan.inv[None, :, :, None].expand(b, nv, n, d)
        # Tokens a virtual head does not select read some slot; `sel` zeroes them exactly.
        o = torch.where(plan.sel[None, :, :, None], o.gather(2, back), 0.0)
        if plan.kind == "compact":
            return o.transpose(1, 2)
        m = self.pattern.num_pairs
        # A finite floor for "not selected": -inf would give nan gradients in the softmax.
        floor = torch.finfo(torch.float32).min / 4
        lse = torch.where(plan.sel[None], lse.float().gather(2, back[..., 0]), floor)
        weights = torch.softmax(lse.view(b, m, h, n), dim=1).to(o.dtype)
        out = (weights.unsqueeze(-1) * o.view(b, m, h, n, d)).sum(dim=1)
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        p = self.pattern
        return (
            f"{super().extra_repr()}, segment_lengths={list(p.segment_lengths)}, "
            f"dilation_rates={list(p.dilation_rates)}, offsets={p.offsets}, heads={p.heads}, "
            f"block_size={self.block_size}"
        )
