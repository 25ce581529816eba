"""The compute of one ``patterns.doc_ring.DocOp``: the ring's op over packed documents.

Same contract as ``_ring_kernel.op_forward`` / ``op_backward`` (accumulators of the whole
query shard in fp32/fp64, a log-sum-exp merge forward, FlashAttention's formulas with the
final out/lse backward), but the op's slots are gathered by index and masked, so a row may
have no allowed key in this op (its keys lie in another block, or after it): such rows get
lse = -inf and contribute nothing, and every exp is taken against a finite stand-in so no
0/0 appears. Buffers are zeroed by the runner (the plan has no copy-first flags).
"""

from __future__ import annotations

import torch

from dilexp.patterns.doc_ring import DocOp


def _slots(x: torch.Tensor, idx: torch.Tensor, op: DocOp, width: int, acc: torch.dtype) -> torch.Tensor:
    """(B, N, H, D) -> (S, Hb, width, D) in ``acc``: the op's slots of its heads."""
    flat = x.reshape(-1, *x.shape[2:])[:, op.heads]
    return flat.index_select(0, idx).unflatten(0, (op.segs, width)).transpose(1, 2).to(acc)


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _scores(qs: torch.Tensor, ks: torch.Tensor, op: DocOp, scale: float) -> torch.Tensor:
    return torch.matmul(qs, ks.transpose(-1, -2)).mul_(scale).masked_fill_(op.hidden, float("-inf"))


def doc_op_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: DocOp, scale: float, out: torch.Tensor,
                   lse: torch.Tensor) -> None:
    """Merge one op into ``out`` (B, Nq, H, D) and ``lse`` (B, Nq, H), both in the acc dtype."""
    acc = out.dtype
    qs, ks, vs = _slots(q, op.q_idx, op, op.lq, acc), _slots(k, op.k_idx, op, op.lk, acc), _slots(
        v, op.k_idx, op, op.lk, acc)
    s = _scores(qs, ks, op, scale)
    # One exp: p = exp(s - rowmax), then lse = rowmax + log(rowsum p); a row with no key here
    # has rowmax -inf (kept finite for the exp) and gets lse = -inf, o = 0.
    top = s.amax(dim=-1, keepdim=True)
    p = s.sub_(_finite(top)).exp_()
    total = p.sum(-1)
    m = top.squeeze(-1) + torch.log(total)
    o = torch.matmul(p, vs).div_(total.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1))
    hb = o.shape[1]
    o = o.transpose(1, 2).reshape(-1, hb, o.shape[-1]).index_select(0, op.q_keep)
    m = m.transpose(1, 2).reshape(-1, hb).index_select(0, op.q_keep)
    out_h = out.view(-1, *out.shape[2:])[:, op.heads]
    lse_h = lse.view(-1, lse.shape[2])[:, op.heads]
    old_o, old_l = out_h.index_select(0, op.q_pos), lse_h.index_select(0, op.q_pos)
    new = torch.logaddexp(old_l, m)
    ref = _finite(new)
    out_h.index_copy_(0, op.q_pos, old_o * torch.exp(old_l - ref).unsqueeze(-1) + o * torch.exp(m - ref).unsqueeze(-1))
    lse_h.index_copy_(0, op.q_pos, new)


def doc_op_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                    lse: torch.Tensor, op: DocOp, scale: float, dq: torch.Tensor, dk: torch.Tensor,
                    dv: torch.Tensor) -> None:
    """Add one op's share to ``dq`` (query shard) and ``dk``/``dv`` (key shard), acc dtype."""
    acc = dq.dtype
    qs, ks, vs = _slots(q, op.q_idx, op, op.lq, acc), _slots(k, op.k_idx, op, op.lk, acc), _slots(
        v, op.k_idx, op, op.lk, acc)
    os_, gs = _slots(out, op.q_idx, op, op.lq, acc), _slots(dout, op.q_idx, op, op.lq, acc)
    lse_h = lse.reshape(-1, lse.shape[2])[:, op.heads]
    ls = lse_h.index_select(0, op.q_idx).unflatten(0, (op.segs, op.lq)).transpose(1, 2).to(acc)
    p = torch.exp(_scores(qs, ks, op, scale) - _finite(ls).unsqueeze(-1))  # masked entries: exactly 0
    delta = (gs * os_).sum(-1, keepdim=True)
    gv = torch.matmul(p.transpose(-1, -2), gs)
    ds = torch.matmul(gs, vs.transpose(-1, -2)).sub_(delta).mul_(p)
    gq = torch.matmul(ds, ks).mul_(scale)
    gk = torch.matmul(ds.transpose(-1, -2), qs).mul_(scale)
    hb = gq.shape[1]
    # Padded slots carry exact zeros (their p rows/columns are 0), so adding them at index 0 is harmless.
    for target, part, idx in ((dq, gq, op.q_idx), (dk, gk, op.k_idx), (dv, gv, op.k_idx)):
        view = target.view(-1, *target.shape[2:])[:, op.heads]
        view.index_add_(0, idx, part.transpose(1, 2).reshape(-1, hb, part.shape[-1]))
