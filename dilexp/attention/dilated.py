"""``dilated``: the LongNet pattern of DESIGN section 3, computed the straightforward way.

Per branch (one (w, r, offset) and the heads that share it) the selected positions of
every segment are gathered with one index tensor from the pattern cache into a
(B, segments, heads, slots, D) batch and attended in one batched call; the last,
shorter segment is padded and its padding masked. This is the readable baseline that
``improved`` must match and beat.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable

import torch
import torch.nn.functional as F

from dilexp.attention._doc_dilated import documents_forward
from dilexp.attention._kernels import explicit_attention, heads_index, lse_dtype, lse_floor, masked_attention_lse
from dilexp.attention.base import Capabilities, DilatedAttentionBase
from dilexp.attention.registry import register
from dilexp.memory.base import MemoryPool
from dilexp.patterns.documents import DocumentLayout
from dilexp.patterns.gather import BranchGather, build_gather_plan, gather_key


def _gather(x: torch.Tensor, g: BranchGather, heads: slice | list[int], pool: MemoryPool,
            scratch: list[torch.Tensor] | None) -> torch.Tensor:
    """(B, N, H, D) -> (B, S, Hb, L, D): the branch's slots, segments as a batch dimension.

    Without autograd (``scratch`` given) the gather lands in a buffer from the pool, given
    back after the branch; with it, the kernel saves the gathers of q, k and v alike for its
    backward, so torch allocates them.
    """
    num_seg, slots = g.idx.shape
    flat = g.idx.reshape(-1)
    src = x[:, :, heads]  # a view: a branch's heads are a strided range
    if scratch is None:
        picked = src.index_select(1, flat)
    else:
        picked = pool.empty((x.shape[0], flat.numel(), len(g.heads), x.shape[3]), x.dtype, x.device)
        torch.index_select(src, 1, flat, out=picked)
        scratch.append(picked)
    return picked.unflatten(1, (num_seg, slots)).permute(0, 1, 3, 2, 4)


@register("dilated")
class DilatedAttention(DilatedAttentionBase):
    """Dilated attention by gather + one batched attention call per branch."""

    capabilities = Capabilities(pattern="dilated", head_layouts=("grouped", "all"), pool=True)

    @functools.cached_property
    def head_slices(self) -> list[slice | list[int]]:
        """Each branch's heads as an index that selects them as a view."""
        return [heads_index(b.heads) for b in self.branches]

    def _plan(self, n: int, causal: bool, device: torch.device | str) -> tuple[tuple, ...]:
        """Every branch's gather plan (patterns/gather.py): one cache lookup per call."""
        key: Hashable = gather_key(self.pattern, n, self.num_heads, causal)
        return self.lookup(key, lambda: build_gather_plan(self.pattern, n, self.num_heads, causal), device)

    def forward_documents(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, docs: DocumentLayout
    ) -> torch.Tensor:
        """Packed documents: one per-layout gather plan for all documents (``_doc_dilated``),
        every segment padded to the longest."""
        return documents_forward(self, q, k, v, causal, docs, bucketed=False)

    def prepare(self, n: int, device: torch.device | str, causal: bool | None = None) -> None:
        for c in (False, True) if causal is None else (causal,):
            self._plan(n, c, device)

    # -- compute ----------------------------------------------------------------------------

    def _attend_lse(
        self, qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of one branch's (B, S, Hb, L, D) batch: a fused masked kernel that
        returns the log-sum-exp where the device has one (CPU flash, CUDA memory-efficient),
        explicit O(S*L^2) attention only where none takes the inputs (fp64 on CUDA)."""
        bsz, segs = qs.shape[:2]
        # (S, 1, L, L) -> (B*S, 1, L, L): the kernels take one leading batch dimension.
        allowed = mask if bsz == 1 else mask.expand(bsz, *mask.shape).flatten(0, 1)
        fused = masked_attention_lse(qs.flatten(0, 1), ks.flatten(0, 1), vs.flatten(0, 1), allowed, self.scale)
        if fused is None:
            return explicit_attention(qs, ks, vs, mask, causal=False, scale=self.scale)
        o_b, lse_b = fused
        return o_b.unflatten(0, (bsz, segs)), lse_b.unflatten(0, (bsz, segs))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        self._check_input(q, k, v)
        bsz, n, h, d = q.shape
        device = q.device
        merge = self.pattern.heads == "all"
        acc = lse_dtype(q.dtype) if merge else q.dtype
        pool = self.pool
        out = pool.empty((bsz, n, h, d), acc, device).zero_()
        if merge:
            run_lse = pool.empty((bsz, n, h), acc, device).fill_(lse_floor(acc))
        tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        scratch: list[torch.Tensor] | None = None if tracked else []
        for entry, hsel in zip(self._plan(n, causal, device), self.head_slices, strict=True):
            g = BranchGather(*entry)
            num_seg, slots = g.idx.shape
            qs, ks, vs = (_gather(x, g, hsel, pool, scratch) for x in (q, k, v))
            if merge:
                o_b, lse_b = self._attend_lse(qs, ks, vs, g.mask)
            else:
                o_b = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=g.mask, scale=self.scale)
            while scratch:
                pool.release(scratch.pop())  # the kernel is done with them
            # Back to (B, S*L, Hb, D), keep the real slots only.
            o_b = o_b.permute(0, 1, 3, 2, 4).reshape(bsz, num_seg * slots, len(g.heads), d)
            o_b = o_b.index_select(1, g.keep)
            where = (slice(None), g.pos.unsqueeze(1), g.heads.unsqueeze(0))
            if not merge:
                out[where] = o_b
                continue
            # Online softmax over the pairs: rescale what is there by the new total.
            lse_b = lse_b.transpose(2, 3).reshape(bsz, num_seg * slots, len(g.heads)).index_select(1, g.keep)
            old_lse = run_lse[where]
            new_lse = torch.logaddexp(old_lse, lse_b)
            out[where] = (
                out[where] * torch.exp(old_lse - new_lse).unsqueeze(-1)
                + o_b.to(acc) * torch.exp(lse_b - new_lse).unsqueeze(-1)
            )
            run_lse[where] = new_lse
        if not merge:
            return out
        pool.release(run_lse)  # autograd keeps only the indices of its reads and writes
        result = out.to(q.dtype)
        if result is not out and not torch.is_grad_enabled():
            pool.release(out)
        return result
