"""The correctness check every attention test shares: the module against DESIGN's dense reference."""

from __future__ import annotations

from typing import Any

import torch

from dilexp.attention.reference import dense_reference


def max_errors(attn: torch.nn.Module, pattern: Any, b: int, n: int, causal: bool,
               dtype: torch.dtype = torch.float32, seed: int = 0,
               layout: str = "bnhd") -> tuple[float, float]:
    """(forward, gradient) max abs error of ``attn`` against the float64 reference on ``pattern``
    (anything with ``dense_multiplicity(n, h)``; passing another pattern than the module's
    checks that a wrong mask is caught).

    layout="qkv" feeds strided q/k/v sliced out of one fused projection, as a model does.
    """
    gen = torch.Generator().manual_seed(seed)
    h, d = attn.num_heads, attn.head_dim
    if layout == "qkv":
        qkv = torch.randn(b, n, 3, h, d, generator=gen).to(dtype).requires_grad_()
        q, k, v = qkv.unbind(2)
        leaves: tuple[torch.Tensor, ...] = (qkv,)
    else:
        q, k, v = (torch.randn(b, n, h, d, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        leaves = (q, k, v)
    grad_out = torch.randn(b, n, h, d, generator=gen).to(dtype)
    out = attn(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, leaves, grad_out)

    leaves64 = tuple(x.detach().double().requires_grad_() for x in leaves)
    q64, k64, v64 = leaves64[0].unbind(2) if layout == "qkv" else leaves64
    ref = dense_reference(q64, k64, v64, pattern.dense_multiplicity(n, h), causal)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
    assert out.shape == ref.shape and out.dtype == dtype
    fwd = (out.double() - ref).abs().max().item()
    bwd = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads, strict=True))
    return fwd, bwd
