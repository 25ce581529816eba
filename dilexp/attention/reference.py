"""The dense reference: the oracle every variant is tested against (DESIGN section 3).

softmax over the allowed keys with an added bias log(multiplicity), -inf where the
multiplicity is 0 (and above the diagonal when causal); a query with no allowed key
gets exactly zero. Computed in float64 so it is an oracle even for fp32 variants.
"""

from __future__ import annotations

import math

import torch


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    multiplicity: torch.Tensor,
    causal: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """q, k, v: (B, N, H, D); multiplicity: (H, N, N) counts (or bool). Returns (B, N, H, D)."""
    b, n, h, d = q.shape
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(d)
    mult = multiplicity.to(device=q.device)
    if causal:
        mult = torch.tril(mult)
    bias = torch.log(mult.to(compute_dtype))  # log 0 = -inf masks the pair
    scores = scores + bias.unsqueeze(0)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out.to(q.dtype)
