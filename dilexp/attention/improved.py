"""``improved``: the function of ``dilated``, computed without gathers or Python loops over segments.

Every selected position set is a strided view. With S = N // w full segments, the
positions a branch (w, r, o) selects in them are

    x[:, :S*w].unflatten(1, (S, w))[:, :, o::r]      -> (B, S, c, H, D), c = ceil((w - o) / r)

and those of the shorter last segment are x[:, S*w + o::r]. Both are views, whatever N,
w and r are, and the heads of a branch are always an arithmetic progression (a group, or
the heads of one offset: step r), so selecting them is a view too. Each piece is one
fused SDPA call with the segments as its batch dimension and no mask: the selected slots
are contiguous, so no padding exists and ``is_causal`` is exactly "causal in the
subsequence". A branch therefore costs one call (two when N % w != 0: the ragged tail),
and results are copied once, straight into the output buffer from the pool.

All branches run in one autograd node (``_FlashCPU``, named for where it started) around
the device's fused kernel and its backward (``_kernels.lse_kernel``: torch's flash kernel
on CPU, flash for bf16/fp16 and memory-efficient for fp32 on CUDA), which also hands out
each branch's log-sum-exp: ``heads="all"`` merges the branches by it in place, and its
backward reuses the kernel's backward with the *merged* output and log-sum-exp (the
ring-attention identity), so the merge costs no extra attention pass. The kernels take
the strided views as they are (only a non-contiguous last dimension would be copied,
``kernel_input``, and the views never have one). Where no fused kernel takes the inputs
(fp64 on CUDA), or with ``use_cpu_flash = False``, the same views go through
``F.scaled_dot_product_attention`` and autograd, and ``heads="all"`` through explicit
attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dilexp.attention._doc_dilated import documents_forward
from dilexp.attention._kernels import (
    LSEKernel,
    explicit_attention,
    kernel_input,
    lse_dtype,
    lse_floor,
    lse_kernel,
)
from dilexp.attention.base import Capabilities, DilatedAttentionBase
from dilexp.attention.registry import register
from dilexp.memory.base import MemoryPool
from dilexp.patterns.documents import DocumentLayout
from dilexp.patterns.strided import BranchPlan, plan_branches, strided_key


def _to_kernel(x: torch.Tensor) -> torch.Tensor:
    """(B, S, c, Hb, D) -> (B*S, Hb, c, D); a view unless B > 1 and a ragged tail splits the batch."""
    return x.flatten(0, 1).transpose(1, 2)


def _from_kernel(x: torch.Tensor, bsz: int) -> torch.Tensor:
    """(B*S, Hb, c, ...) -> (B, S, c, Hb, ...), always a view."""
    return x.transpose(1, 2).unflatten(0, (bsz, -1))


class _FlashCPU(torch.autograd.Function):
    """All branches in one autograd node: the device's fused kernel forward and backward.

    One node instead of a chain of view/copy nodes matters: autograd would otherwise give
    every branch a full-size zero gradient for q, k and v and sum them, which on CPU costs
    a large share of the step (fresh pages for every buffer).

    ``merge`` (heads="all"): branch outputs are merged in place by their log-sum-exps.
    Backward then calls the kernel's backward with the *merged* output and log-sum-exp
    instead of the piece's own. The kernel recomputes probabilities
    exp(s - lse_merged) = weight * p_piece and the row term rowsum(dO * out_merged), which
    is exactly the gradient through the softmax-of-lse merge (as in ring attention).
    Without ``merge`` (heads="grouped") pieces never overlap, so results are copied, not
    accumulated, and only heads with unselected positions are zero-filled.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plans: tuple[BranchPlan, ...],
        causal: bool,
        scale: float,
        merge: bool,
        pool: MemoryPool,
        kernel: LSEKernel,
    ) -> torch.Tensor:
        bsz, n, h, d = q.shape
        acc = lse_dtype(q.dtype) if merge else q.dtype
        out = pool.empty((bsz, n, h, d), acc, q.device)
        _zero_uncovered(out, plans, merge)
        # Merging needs a running log-sum-exp per (position, head); without merging each
        # piece's own lse is what its backward needs, kept in the kernel's layout.
        lse = pool.empty((bsz, n, h), acc, q.device).fill_(lse_floor(acc)) if merge else None
        piece_lse: list[torch.Tensor] = []
        for plan in plans:
            for p in plan.pieces:
                qv, kv, vv = (kernel_input(_to_kernel(p.view(x, plan.heads))) for x in (q, k, v))
                o_p, l_p = kernel.forward(qv, kv, vv, causal, scale)
                out_v = p.view(out, plan.heads)
                if lse is None:
                    out_v.copy_(_from_kernel(o_p, bsz))
                    piece_lse.append(l_p)
                    continue
                o_p = _from_kernel(o_p, bsz)
                l_p = _from_kernel(l_p.to(acc), bsz)
                lse_v = p.view(lse, plan.heads)
                new = torch.logaddexp(lse_v, l_p)
                out_v.mul_(torch.exp(lse_v - new).unsqueeze(-1))
                out_v.add_(o_p.to(acc) * torch.exp(l_p - new).unsqueeze(-1))
                lse_v.copy_(new)
        result = out if acc == q.dtype else out.to(q.dtype)
        if result is not out:
            pool.release(out)
        ctx.save_for_backward(q, k, v, result, *([lse] if merge else piece_lse))
        ctx.plans, ctx.causal, ctx.scale, ctx.merge, ctx.pool = plans, causal, scale, merge, pool
        ctx.kernel = kernel
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, *lses = ctx.saved_tensors
        bsz = q.shape[0]
        piece_lse = iter(lses)
        grads = [ctx.pool.empty(q.shape, q.dtype, q.device) for _ in range(3)]
        for g in grads:
            _zero_uncovered(g, ctx.plans, ctx.merge)
        for plan in ctx.plans:
            for p in plan.pieces:
                qv, kv, vv, ov, gv = (kernel_input(_to_kernel(p.view(x, plan.heads))) for x in (q, k, v, out, grad))
                if ctx.merge:
                    # The kernel reads lse as one contiguous (B*S, Hb, c) block.
                    lv = p.view(lses[0], plan.heads).flatten(0, 1).transpose(1, 2).contiguous()
                else:
                    lv = next(piece_lse)
                parts = ctx.kernel.backward(gv, qv, kv, vv, ov, lv, ctx.causal, ctx.scale)
                for g_full, g_part in zip(grads, parts, strict=True):
                    target = p.view(g_full, plan.heads)
                    if ctx.merge:
                        target.add_(_from_kernel(g_part, bsz))
                    else:
                        target.copy_(_from_kernel(g_part, bsz))
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


def _zero_uncovered(x: torch.Tensor, plans: tuple[BranchPlan, ...], merge: bool) -> None:
    """Zero what the pieces will not overwrite: all of it when they accumulate, else only
    the positions no piece of a head selects (there are none for a rate-1 branch)."""
    if merge:
        x.zero_()
        return
    for plan in plans:
        for blank in plan.blanks:
            blank.view(x, plan.heads).zero_()


@register("improved")
class ImprovedDilatedAttention(DilatedAttentionBase):
    """Dilated attention by strided views and one fused SDPA call per branch (plus a ragged tail)."""

    # "fused": the device's LSE kernel in one autograd node (where none takes the inputs the
    # portable path runs anyway); "portable": the SDPA/explicit path through autograd.
    capabilities = Capabilities(pattern="dilated", head_layouts=("grouped", "all"), paths=("fused", "portable"),
                                pool=True)
    # False forces the portable (autograd) path where a fused kernel exists: tests cover both.
    # (The name predates the CUDA kernels; it now selects the fused path on every device.)
    use_cpu_flash = True

    def use_path(self, path: str) -> None:
        super().use_path(path)
        self.use_cpu_flash = path == "fused"

    def _plans(self, n: int, device: torch.device | str) -> tuple[BranchPlan, ...]:
        # The "pattern" here is a handful of slice bounds; going through the cache keeps
        # hit/miss statistics comparable with the index-based variants.
        p, h = self.pattern, self.num_heads
        return self.lookup(strided_key(p, n, h), lambda: plan_branches(p, n, h), device)

    def forward_documents(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, docs: DocumentLayout
    ) -> torch.Tensor:
        """Packed documents: one per-layout gather plan for all documents (``_doc_dilated``);
        segments bucketed by length, full ones unpadded."""
        kernel = lse_kernel(q) if self.use_cpu_flash else None
        return documents_forward(self, q, k, v, causal, docs, bucketed=True, kernel=kernel)

    def prepare(self, n: int, device: torch.device | str, causal: bool | None = None) -> None:
        self._plans(n, device)  # one plan serves both masks

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        self._check_input(q, k, v)
        plans = self._plans(q.shape[1], q.device)
        merge = self.pattern.heads == "all"
        kernel = lse_kernel(q) if self.use_cpu_flash else None
        if kernel is not None:
            return _FlashCPU.apply(q, k, v, plans, causal, self.scale, merge, self.pool, kernel)
        if merge:
            return self._merged_portable(q, k, v, plans, causal)
        return self._grouped(q, k, v, plans, causal)

    def _grouped(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: tuple[BranchPlan, ...], causal: bool
    ) -> torch.Tensor:
        bsz = q.shape[0]
        out = self.pool.empty(q.shape, q.dtype, q.device)
        _zero_uncovered(out, plans, merge=False)
        for plan in plans:
            for p in plan.pieces:
                qv, kv, vv = (_to_kernel(p.view(x, plan.heads)) for x in (q, k, v))
                res = F.scaled_dot_product_attention(qv, kv, vv, is_causal=causal, scale=self.scale)
                p.view(out, plan.heads).copy_(_from_kernel(res, bsz))
        return out

    def _merged_portable(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: tuple[BranchPlan, ...], causal: bool
    ) -> torch.Tensor:
        """heads="all" through autograd: explicit attention on the same views, online lse merge."""
        bsz, n, h, d = q.shape
        acc = lse_dtype(q.dtype)
        out = self.pool.empty((bsz, n, h, d), acc, q.device).zero_()
        lse = self.pool.empty((bsz, n, h), acc, q.device).fill_(lse_floor(acc))
        for plan in plans:
            for p in plan.pieces:
                qv, kv, vv = (_to_kernel(p.view(x, plan.heads)) for x in (q, k, v))
                o_p, l_p = explicit_attention(qv, kv, vv, None, causal, self.scale)
                o_p, l_p = _from_kernel(o_p, bsz).to(acc), _from_kernel(l_p, bsz)
                out_v, lse_v = p.view(out, plan.heads), p.view(lse, plan.heads)
                # Clones: autograd needs the pre-merge values after the in-place update.
                old_o, old_l = out_v.clone(), lse_v.clone()
                new = torch.logaddexp(old_l, l_p)
                merged = old_o * torch.exp(old_l - new).unsqueeze(-1) + o_p * torch.exp(l_p - new).unsqueeze(-1)
                out_v.copy_(merged)
                lse_v.copy_(new)
        return out.to(q.dtype)
