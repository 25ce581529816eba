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
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def _gather(x: torch.Tensor, idx: torch.Tensor, heads: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, H, D)[:, idx (S, L), heads] -> (B, S, L, h, D) in ``dtype``."""
    s, slots = idx.shape
    picked = x[:, idx.reshape(-1)[:, None], heads[None, :]]
    return picked.to(dtype).unflatten(1, (s, slots))


def _scores(qg: torch.Tensor, kg: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    s = torch.einsum("bslhd,bsmhd->bhslm", qg, kg) * scale
    return s.masked_fill(~mask, float("-inf"))


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
    bsz, d = q.shape[0], q.shape[-1]
    for heads, q_idx, k_idx, mask, q_sel, q_loc, _k_sel, _k_loc in pattern:
        s_n, lq = q_idx.shape
        h = heads.numel()
        qg, kg, vg = _gather(q, q_idx, heads, acc), _gather(k, k_idx, heads, acc), _gather(v, k_idx, heads, acc)
        scores = _scores(qg, kg, mask, scale)
        m = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - _finite(m).unsqueeze(-1))
        o = torch.einsum("bhslm,bsmhd->bslhd", p, vg)
        o = o.reshape(bsz, s_n * lq, h, d).index_select(1, q_sel)
        m = m.permute(0, 2, 3, 1).reshape(bsz, s_n * lq, h).index_select(1, q_sel)
        where = (slice(None), q_loc[:, None], heads[None, :])
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
    bsz, d = q.shape[0], q.shape[-1]
    for heads, q_idx, k_idx, mask, q_sel, q_loc, k_sel, k_loc in pattern:
        s_n, lq = q_idx.shape
        lk = k_idx.shape[1]
        h = heads.numel()
        qg, kg, vg = _gather(q, q_idx, heads, acc), _gather(k, k_idx, heads, acc), _gather(v, k_idx, heads, acc)
        dog = _gather(dout, q_idx, heads, acc)
        # Per-row statistics gathered like the queries: (B, S, Lq, h) -> (B, h, S, Lq).
        rows = (slice(None), q_idx.reshape(-1)[:, None], heads[None, :])
        m = lse[rows].unflatten(1, (s_n, lq)).permute(0, 3, 1, 2)
        dl = delta[rows].unflatten(1, (s_n, lq)).permute(0, 3, 1, 2)
        p = torch.exp(_scores(qg, kg, mask, scale) - _finite(m).unsqueeze(-1))
        dvg = torch.einsum("bhslm,bslhd->bsmhd", p, dog)
        ds = p * (torch.einsum("bslhd,bsmhd->bhslm", dog, vg) - dl.unsqueeze(-1))
        dqg = torch.einsum("bhslm,bsmhd->bslhd", ds, kg) * scale
        dkg = torch.einsum("bhslm,bslhd->bsmhd", ds, qg) * scale
        # Real slots map to distinct positions within a branch, so += cannot collide.
        qw = (slice(None), q_loc[:, None], heads[None, :])
        kw = (slice(None), k_loc[:, None], heads[None, :])
        dq[qw] += dqg.reshape(bsz, s_n * lq, h, d).index_select(1, q_sel)
        dk[kw] += dkg.reshape(bsz, s_n * lk, h, d).index_select(1, k_sel)
        dv[kw] += dvg.reshape(bsz, s_n * lk, h, d).index_select(1, k_sel)
