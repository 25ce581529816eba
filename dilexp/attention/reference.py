"""The dense reference: the oracle every variant is tested against (DESIGN section 3).

softmax over the allowed keys with an added bias log(multiplicity), -inf where the
multiplicity is 0 (and above the diagonal when causal); a query with no allowed key
gets exactly zero. Computed in float64 so it is an oracle even for fp32 variants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from dilexp.patterns.documents import DocumentLayout


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    multiplicity: torch.Tensor,
    causal: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """q, k, v: (B, N, H, D); multiplicity: (H, N, N) counts (or bool), or (B, H, N, N) when
    it differs per row (packed documents: ``document_multiplicity``). Returns (B, N, H, D)."""
    b, n, h, d = q.shape
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(d)
    mult = multiplicity.to(device=q.device)
    if causal:
        mult = torch.tril(mult)
    bias = torch.log(mult.to(compute_dtype))  # log 0 = -inf masks the pair
    scores = scores + (bias if bias.dim() == 4 else bias.unsqueeze(0))
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out.to(q.dtype)


def reference_lse(
    q: torch.Tensor, k: torch.Tensor, multiplicity: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """(B, N, H) float64 log-sum-exp of each query row of the reference (-inf: no allowed key)."""
    d = q.shape[-1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(d)
    mult = multiplicity.to(device=q.device)
    if causal:
        mult = torch.tril(mult)
    bias = torch.log(mult.double())
    scores = scores + (bias if bias.dim() == 4 else bias.unsqueeze(0))
    return torch.logsumexp(scores, dim=-1).transpose(1, 2)


def document_multiplicity(variant: Any, layout: DocumentLayout) -> torch.Tensor:
    """(B, H, N, N) int64: block-diagonal, each document's block the variant's own
    ``dense_multiplicity(doc_len)``; zero across documents (the document-masked oracle).

    ``variant``: anything with ``dense_multiplicity(n) -> (H, n, n)`` (a module, or a pattern
    wrapper built from the settings so the oracle does not trust the module under test).
    """
    blocks: dict[int, torch.Tensor] = {}
    out = None
    for r in range(layout.batch):
        for a, b in layout.spans(r):
            if b - a not in blocks:
                blocks[b - a] = variant.dense_multiplicity(b - a).to(torch.int64)
            block = blocks[b - a]
            if out is None:
                out = torch.zeros(layout.batch, block.shape[0], layout.n, layout.n, dtype=torch.int64)
            out[r, :, a:b, a:b] = block
    assert out is not None
    return out


# (head, start, stop) -> rows [start, stop) of that head's (N, N) multiplicity, int64.
MultRows = Callable[[int, int, int], torch.Tensor]


def reference_with_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    mult_rows: MultRows,
    causal: bool = False,
    block: int = 1024,
) -> dict[str, torch.Tensor]:
    """The reference's output, log-sum-exp and q/k/v gradients (for upstream gradient ``dout``)
    in float64, one (head, block of query rows) at a time.

    The same function as ``dense_reference`` + autograd, written out so that no (H, N, N)
    tensor is ever held: memory is O(block * N), which takes the oracle to N = 8K and
    beyond (task=check). Backward is the softmax identity
        dV = P^T dO,  dS = P * (dO V^T - rowsum(dO * O)),  dQ = s dS K,  dK = s dS^T Q.
    Returns float64 tensors: out, dq, dk, dv (B, N, H, D) and lse (B, N, H).
    """
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    qf, kf, vf, gf = (t.detach().to(torch.float64) for t in (q, k, v, dout))
    out = torch.zeros_like(qf)
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(qf), torch.zeros_like(qf)
    lse = torch.full((b, n, h), float("-inf"), dtype=torch.float64, device=q.device)
    keys = torch.arange(n, device=q.device)
    for head in range(h):
        kh, vh = kf[:, :, head], vf[:, :, head]  # (B, N, D)
        for start in range(0, n, block):
            stop = min(n, start + block)
            mult = mult_rows(head, start, stop).to(device=q.device, dtype=torch.float64)
            if causal:
                mult = mult * (keys[None, :] <= torch.arange(start, stop, device=q.device)[:, None])
            qh, gh = qf[:, start:stop, head], gf[:, start:stop, head]  # (B, L, D)
            scores = torch.matmul(qh, kh.transpose(1, 2)) * scale + torch.log(mult)
            row_lse = torch.logsumexp(scores, dim=-1)  # (B, L); -inf where nothing is allowed
            empty = torch.isneginf(row_lse)
            probs = torch.exp(scores - torch.where(empty, 0.0, row_lse).unsqueeze(-1))
            probs = probs.masked_fill(empty.unsqueeze(-1), 0.0)
            o = torch.matmul(probs, vh)
            out[:, start:stop, head] = o
            lse[:, start:stop, head] = row_lse
            delta = (gh * o).sum(-1, keepdim=True)
            ds = probs * (torch.matmul(gh, vh.transpose(1, 2)) - delta)
            dq[:, start:stop, head] = torch.matmul(ds, kh) * scale
            dk[:, :, head] += torch.matmul(ds.transpose(1, 2), qh) * scale
            dv[:, :, head] += torch.matmul(probs.transpose(1, 2), gh)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
