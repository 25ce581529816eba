"""The compute of one block pair: forward with an online log-sum-exp merge, and its backward.

Both work on a block pattern from ``_ring_plan.build_block_pattern`` and write into
whole-shard accumulators in place, so a caller can stream block pairs through them in any
order. Scores, probabilities and accumulators are kept in ``acc_dtype`` (fp32, or fp64
for fp64 inputs): a bf16 log-sum-exp merge would cost more error than the kernel.

Backward (per branch, FlashAttention's formulas with the *final* log-sum-exp ``lse`` of
each query and ``delta = rowsum(dO * O)``):
    P = exp(S - lse),  dV += P^T dO,  dS = P * (dO V^T - delta),
    dQ += scale * dS K,  dK += scale * dS^T Q.
Because ``lse`` is final, every block pair's share is exact on its own, and the shares
simply add up; that is what lets the backward run block by block around the ring.
"""

from __future__ import annotations

import torch

BlockPattern = tuple[tuple[torch.Tensor, ...], ...]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite(x: torch.Tensor) -> torch.Tensor:
    """-inf (a row with no allowed key yet) -> 0, so exp(-inf - 0) = 0 instead of nan."""
    return x.masked_fill(torch.isneginf(x), 0.0)


HeadSel = slice | torch.Tensor


def _heads(x: torch.Tensor, heads: HeadSel) -> torch.Tensor:
    """x[:, :, heads]: a view for a slice."""
    return x[:, :, heads] if isinstance(heads, slice) else x.index_select(2, heads)


def _gather(x: torch.Tensor, idx: torch.Tensor, heads: HeadSel, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, H, ...)[:, idx (S, L), heads] -> (B, S, h, L, ...) contiguous, in ``dtype``.

    Positions first (index_select on the contiguous input is the fast path), then the heads
    as a view. The (B, S, h) batch layout lets every matmul below run as a plain batched
    GEMM and keeps the large (Lq, Lk) score tensors free of permute copies.
    """
    s, slots = idx.shape
    picked = _heads(x.index_select(1, idx.reshape(-1)), heads).unflatten(1, (s, slots))
    return picked.movedim(3, 2).to(dtype).contiguous()


def _rows(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """(B, S, h, L, ...) -> (B, M, h, ...): the real slots ``sel`` of the flattened (S, L)."""
    x = x.movedim(2, 3)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:]).index_select(1, sel)


def _probs(qg: torch.Tensor, kg: torch.Tensor, blocked: torch.Tensor, scale: float,
           lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax numerators exp(S - lse) and the lse used (the block's own when None), in place."""
    scores = torch.matmul(qg, kg.transpose(-1, -2)).mul_(scale)
    scores.masked_fill_(blocked, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return scores.sub_(_finite(lse).unsqueeze(-1)).exp_(), lse


def _where(loc: torch.Tensor, heads: HeadSel) -> tuple:
    """Index for x[:, loc, heads] as a (B, M, h, ...) block that can be read and written."""
    if isinstance(heads, slice):
        return (slice(None), loc, heads)
    return (slice(None), loc[:, None], heads[None, :])


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Merge one block pair into ``out`` (B, Nq, H, D) and ``lse`` (B, Nq, H), both acc dtype."""
    acc = out.dtype
    for heads, q_idx, k_idx, blocked, q_sel, q_loc, _k_sel, _k_loc in pattern:
        qg, kg, vg = _gather(q, q_idx, heads, acc), _gather(k, k_idx, heads, acc), _gather(v, k_idx, heads, acc)
        p, m = _probs(qg, kg, blocked, scale, None)
        o = _rows(torch.matmul(p, vg), q_sel)
        m = _rows(m, q_sel)
        where = _where(q_loc, heads)
        old = lse[where]
        new = torch.logaddexp(old, m)
        ref = _finite(new)
        out[where] = out[where] * torch.exp(old - ref).unsqueeze(-1) + o * torch.exp(m - ref).unsqueeze(-1)
        lse[where] = new


def block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    pattern: BlockPattern,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Add one block pair's share to ``dq`` (query shard) and ``dk``/``dv`` (key shard), acc dtype."""
    acc = dq.dtype
    for heads, q_idx, k_idx, blocked, q_sel, q_loc, k_sel, k_loc in pattern:
        qg, kg, vg = _gather(q, q_idx, heads, acc), _gather(k, k_idx, heads, acc), _gather(v, k_idx, heads, acc)
        dog = _gather(dout, q_idx, heads, acc)
        # Per-row statistics gathered like the queries: (B, S, h, Lq).
        p, _ = _probs(qg, kg, blocked, scale, _gather(lse, q_idx, heads, acc))
        dl = _gather(delta, q_idx, heads, acc)
        dvg = torch.matmul(p.transpose(-1, -2), dog)
        ds = torch.matmul(dog, vg.transpose(-1, -2)).sub_(dl.unsqueeze(-1)).mul_(p)
        dqg = torch.matmul(ds, kg).mul_(scale)
        dkg = torch.matmul(ds.transpose(-1, -2), qg).mul_(scale)
        # Real slots map to distinct positions within a branch, so += cannot collide.
        qw, kw = _where(q_loc, heads), _where(k_loc, heads)
        dq[qw] += _rows(dqg, q_sel)
        dk[kw] += _rows(dkg, k_sel)
        dv[kw] += _rows(dvg, k_sel)
