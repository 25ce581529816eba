"""The compute of one ``BlockOp``: forward with a log-sum-exp merge, and its backward.

Every op is attention between two strided views (``Span``) of whole-shard tensors:
nothing is gathered, padded or masked, and K/V are never copied (single-process they are
views of the caller's tensors). Results go straight into whole-shard accumulators, so a
caller can stream ops in any order:

- forward: the first op to write a span of query rows (``q_first``) copies its output and
  log-sum-exp; later ones merge by log-sum-exp into ``out``/``lse`` (fp32, or fp64 for
  fp64 inputs: a bf16 merge would cost more error than the kernel);
- backward: FlashAttention's formulas with the *final* ``out``/``lse`` of each query,
      P = exp(S - lse),  delta = rowsum(dO * O),  dV += P^T dO,
      dS = P * (dO V^T - delta),  dQ += scale dS K,  dK += scale dS^T Q,
  so every op's share is exact on its own and the shares simply add up (the first
  share of a span is copied: ``q_first``/``k_first``). That is what lets the backward run op by op around the ring.

Two implementations of one op: the fused kernel of the device (``_kernels.lse_kernel``:
torch's flash kernel on CPU, flash / memory-efficient on CUDA, whose backwards take the
final out/lse directly), and a portable one (explicit matmuls on the same views, any
device; its causal masks come from the pattern cache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dilexp.attention._kernels import LSEKernel, kernel_input, lse_kernel
from dilexp.patterns.ring_ops import BlockOp, Span


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# (size, device) -> bool (size, size) mask of the entries above the diagonal.
MaskFn = Callable[[int, torch.device], torch.Tensor]


def _kview(x: torch.Tensor, span: Span, heads: slice) -> torch.Tensor:
    """(B, N, H, ...) -> (B*S, h, L, ...): the kernel's layout; a view except when B > 1 and S > 1."""
    return span.view(x, heads).flatten(0, 1).transpose(1, 2)


def _unk(x: torch.Tensor, bsz: int) -> torch.Tensor:
    """(B*S, h, L, ...) -> (B, S, L, h, ...), always a view (the layout of ``Span.view``)."""
    return x.transpose(1, 2).unflatten(0, (bsz, -1))


def _fused_kernel(x: torch.Tensor) -> LSEKernel:
    kernel = lse_kernel(x)
    if kernel is None:  # ``fused`` is only set where lse_kernel answers (ring.py)
        raise RuntimeError(f"ring: no fused kernel for {x.dtype} on {x.device}")
    return kernel


def _attend(qk: torch.Tensor, kk: torch.Tensor, vk: torch.Tensor, causal: bool, scale: float,
            acc: torch.dtype, fused: bool, mask: MaskFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of kernel-layout views; out in q's dtype (fused) or ``acc`` (portable)."""
    if fused:
        return _fused_kernel(qk).forward(qk, kk, vk, causal, scale)
    p, lse = _probs(qk, kk, causal, scale, acc, mask, None)
    return torch.matmul(p, vk.to(acc)), lse


def _probs(qk: torch.Tensor, kk: torch.Tensor, causal: bool, scale: float, acc: torch.dtype, mask: MaskFn,
           lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(S - lse) (in place on the scores) and the lse used: the rows' own when ``lse`` is None."""
    scores = torch.matmul(qk.to(acc), kk.to(acc).transpose(-1, -2)).mul_(scale)
    if causal:
        scores.masked_fill_(mask(scores.shape[-1], scores.device), float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return scores.sub_(lse.unsqueeze(-1)).exp_(), lse


def op_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    op: BlockOp,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    fused: bool,
    mask: MaskFn,
) -> torch.Tensor | None:
    """Merge (or copy) one op into ``out`` (B, Nq, H, D) and ``lse`` (B, Nq, H), both acc dtype.

    Returns the op's own log-sum-exp (kernel layout) when it is final (``q_only``): the
    backward takes it as is, and ``lse`` is not written (those rows stay -inf there).
    """
    bsz, acc = q.shape[0], out.dtype
    o, m_k = _attend(_kview(q, op.q, op.heads), _kview(k, op.k, op.heads), _kview(v, op.k, op.heads),
                     op.causal, scale, acc, fused, mask)
    o, m = _unk(o, bsz), _unk(m_k, bsz)
    out_v, lse_v = op.q.view(out, op.heads), op.q.view(lse, op.heads)
    if op.q_first:
        out_v.copy_(o)
        if op.q_only:
            return m_k
        lse_v.copy_(m)
        return None
    # No row of an op is empty (a causal op's queries see themselves), so m and new are finite.
    m = m.to(acc)
    new = torch.logaddexp(lse_v, m)
    out_v.mul_(torch.exp(lse_v - new).unsqueeze(-1)).addcmul_(o.to(acc), torch.exp(m - new).unsqueeze(-1))
    lse_v.copy_(new)
    return None


def _put(target: torch.Tensor, part: torch.Tensor, first: bool) -> None:
    if first:
        target.copy_(part)
    else:
        target.add_(part)


def op_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    op: BlockOp,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    fused: bool,
    mask: MaskFn,
    own_lse: torch.Tensor | None = None,
) -> None:
    """Add (or copy) one op's share to ``dq`` (query shard) and ``dk``/``dv`` (key shard), acc dtype.

    ``out``/``lse`` are the final (merged) output and log-sum-exp of the query shard;
    ``own_lse`` what ``op_forward`` returned for a ``q_only`` op (used instead of ``lse``).
    """
    bsz, acc = q.shape[0], dq.dtype
    qk, kk, vk = _kview(q, op.q, op.heads), _kview(k, op.k, op.heads), _kview(v, op.k, op.heads)
    ok, gk = _kview(out, op.q, op.heads), _kview(dout, op.q, op.heads)
    lk = _kview(lse, op.q, op.heads) if own_lse is None else own_lse
    if fused:
        # The kernel reads the log-sum-exp as one contiguous (B*S, h, L) block.
        gq, gkey, gval = _fused_kernel(qk).backward(
            kernel_input(gk), qk, kk, vk, kernel_input(ok), lk.contiguous(), op.causal, scale)
    else:
        p, _ = _probs(qk, kk, op.causal, scale, acc, mask, lk.to(acc))
        g32 = gk.to(acc)
        delta = (g32 * ok.to(acc)).sum(-1, keepdim=True)
        gval = torch.matmul(p.transpose(-1, -2), g32)
        ds = torch.matmul(g32, vk.to(acc).transpose(-1, -2)).sub_(delta).mul_(p)
        gq = torch.matmul(ds, kk.to(acc)).mul_(scale)
        gkey = torch.matmul(ds.transpose(-1, -2), qk.to(acc)).mul_(scale)
    _put(op.q.view(dq, op.heads), _unk(gq, bsz), op.q_first)
    _put(op.k.view(dk, op.heads), _unk(gkey, bsz), op.k_first)
    _put(op.k.view(dv, op.heads), _unk(gval, bsz), op.k_first)
