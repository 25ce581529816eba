"""The packed-documents path of ``dilated`` and ``improved`` (issue 18): one per-layout plan
(``patterns.doc_plans``) from the cache, one gather per (branch, bucket) over the flattened
(B * N) batch, one batched attention call each, results written back by index.

Autograd runs through it as through ``dilated``: the gathers' backward scatters the
gradients back, and padded slots carry none (their outputs are dropped; a padded key is
masked, or only seen by padded queries whose gradient is zero).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dilexp.attention._kernels import LSEKernel, explicit_attention, heads_index, lse_dtype, lse_floor
from dilexp.attention.base import DilatedAttentionBase
from dilexp.patterns.doc_plans import DocBucket, build_doc_plan, doc_plan_key
from dilexp.patterns.documents import DocumentLayout


def doc_plan(attn: DilatedAttentionBase, docs: DocumentLayout, causal: bool, bucketed: bool,
             device: torch.device | str) -> tuple[tuple, ...]:
    """The layout's plan through the variant's cache: built once per layout, a hit for every
    later layer of the step."""
    p, h = attn.pattern, attn.num_heads
    return attn.lookup(doc_plan_key(p, docs, h, causal, bucketed),
                       lambda: build_doc_plan(p, docs, h, causal, bucketed), device)


def _slots(flat: torch.Tensor, hsel: slice | list[int], bk: DocBucket) -> torch.Tensor:
    """(B*N, H, D) -> (S, Hb, L, D): a bucket's slots, gathered into one contiguous buffer."""
    segs, slots = bk.idx.shape
    return flat[:, hsel].index_select(0, bk.idx.reshape(-1)).unflatten(0, (segs, slots)).transpose(1, 2)


def _real(x: torch.Tensor, bk: DocBucket) -> torch.Tensor:
    """(S, Hb, L, D) -> (P, Hb, D): the real slots, in the order of ``bk.pos``."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]).index_select(0, bk.keep)


class _DocFlash(torch.autograd.Function):
    """``improved``'s document path in one autograd node (heads="grouped", no masks): the
    device's fused kernel forward and backward on the gathered buckets.

    Through autograd each gather would get a full-size zero gradient and a scatter-add; here
    a branch's real slots are distinct positions of its own heads, so results and gradients
    are *copied* back by index into buffers zeroed once.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                plan: tuple[tuple, ...], causal: bool, scale: float, kernel: LSEKernel) -> torch.Tensor:
        bsz, n, h, d = q.shape
        flat = [x.reshape(bsz * n, h, d) for x in (q, k, v)]
        out = torch.zeros(bsz * n, h, d, dtype=q.dtype, device=q.device)
        saved: list[tuple[torch.Tensor, ...]] = []
        for heads_t, buckets in plan:
            hsel = heads_index(heads_t.tolist())
            for entry in buckets:
                bk = DocBucket(*entry)
                qs, ks, vs = (_slots(x, hsel, bk) for x in flat)
                o, lse = kernel.forward(qs, ks, vs, causal, scale)
                out[:, hsel].index_copy_(0, bk.pos, _real(o, bk))
                saved.append((qs, ks, vs, o, lse))
        ctx.plan, ctx.causal, ctx.scale, ctx.kernel, ctx.saved_buckets = plan, causal, scale, kernel, saved
        ctx.shape = q.shape
        return out.view(bsz, n, h, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        bsz, n, h, d = ctx.shape
        g_flat = grad.reshape(bsz * n, h, d)
        grads = [torch.zeros(bsz * n, h, d, dtype=grad.dtype, device=grad.device) for _ in range(3)]
        saved = iter(ctx.saved_buckets)
        for heads_t, buckets in ctx.plan:
            hsel = heads_index(heads_t.tolist())
            for entry in buckets:
                bk = DocBucket(*entry)
                qs, ks, vs, o, lse = next(saved)
                # Padded query slots must carry a zero gradient (their outputs were dropped), or
                # they would push gradient into the keys they see.
                segs, slots = bk.idx.shape
                if bk.keep.numel() == segs * slots:  # no padding (e.g. every full segment): gather as is
                    gs = _slots(g_flat, hsel, bk)
                else:
                    gs = g_flat.new_zeros(segs * slots, qs.shape[1], qs.shape[3])
                    gs.index_copy_(0, bk.keep, g_flat[:, hsel].index_select(0, bk.pos))
                    gs = gs.unflatten(0, (segs, slots)).transpose(1, 2)
                parts = ctx.kernel.backward(gs, qs, ks, vs, o, lse, ctx.causal, ctx.scale)
                for g_full, part in zip(grads, parts, strict=True):
                    g_full[:, hsel].index_copy_(0, bk.pos, _real(part, bk))
        ctx.saved_buckets = None
        return (*(g.view(bsz, n, h, d) for g in grads), None, None, None, None)


def documents_forward(attn: DilatedAttentionBase, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      causal: bool, docs: DocumentLayout, bucketed: bool,
                      kernel: LSEKernel | None = None) -> torch.Tensor:
    """Every document as its own sequence, all documents batched (see the module docstring).

    ``kernel``: ``improved``'s fused kernel, used (``_DocFlash``) when the plan needs no mask
    and the heads do not merge; otherwise the autograd path below."""
    attn._check_input(q, k, v)
    attn._check_layout(q, docs)
    bsz, n, h, d = q.shape
    merge = attn.pattern.heads == "all"
    if kernel is not None and not merge:
        plan = doc_plan(attn, docs, causal, bucketed, q.device)
        if all(DocBucket(*bk).mask is None for _, buckets in plan for bk in buckets):
            return _DocFlash.apply(q, k, v, plan, causal, attn.scale, kernel)
    acc = lse_dtype(q.dtype) if merge else q.dtype
    flat = [x.reshape(bsz * n, h, d) for x in (q, k, v)]
    out = torch.zeros(bsz * n, h, d, dtype=acc, device=q.device)
    run_lse = torch.full((bsz * n, h), lse_floor(acc), dtype=acc, device=q.device) if merge else None
    for heads_t, buckets in doc_plan(attn, docs, causal, bucketed, q.device):
        hsel = heads_index(heads_t.tolist()) if heads_t.numel() else []
        hb = heads_t.numel()
        for entry in buckets:
            bk = DocBucket(*entry)
            segs, slots = bk.idx.shape
            # (B*N, H, D) -> (S, Hb, L, D): segments of all documents as one batch.
            qs, ks, vs = (x[:, hsel].index_select(0, bk.idx.reshape(-1)).unflatten(0, (segs, slots)).transpose(1, 2)
                          for x in flat)
            where = (bk.pos.unsqueeze(1), heads_t.unsqueeze(0))
            if run_lse is None:
                o_b = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bk.mask, scale=attn.scale,
                                                     is_causal=causal and bk.mask is None)
                out[where] = o_b.transpose(1, 2).reshape(segs * slots, hb, d).index_select(0, bk.keep)
                continue
            # heads="all": merge this branch into the running output by log-sum-exp.
            o_b, lse_b = explicit_attention(qs, ks, vs, bk.mask, causal=causal and bk.mask is None,
                                            scale=attn.scale)
            o_b = o_b.transpose(1, 2).reshape(segs * slots, hb, d).index_select(0, bk.keep)
            lse_b = lse_b.transpose(1, 2).reshape(segs * slots, hb).index_select(0, bk.keep)
            old = run_lse[where]
            new = torch.logaddexp(old, lse_b)
            out[where] = out[where] * torch.exp(old - new).unsqueeze(-1) + o_b.to(acc) * torch.exp(
                lse_b - new).unsqueeze(-1)
            run_lse[where] = new
    return out.view(bsz, n, h, d).to(q.dtype)
