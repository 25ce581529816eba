"""Helpers shared by the dilated variants: validation, head selection, log-sum-exp merging."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dilexp.errors import ConfigError
from dilexp.patterns.dilated import DilatedPattern
from dilexp.patterns.strided import heads_index as heads_index  # re-exported: the variants' import


def check_dims(num_heads: object, head_dim: object) -> None:
    """Reject head counts / sizes before ``Attention.__init__`` silently truncates them with int()."""
    for field, value in (("model.n_head", num_heads), ("model.head_dim", head_dim)):
        try:
            # operator.index takes every integer type (numpy's too) and refuses 6.5 and "8".
            ok = not isinstance(value, bool) and operator.index(value) >= 1  # True heads is a typo
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(field, value, "must be an integer >= 1")


def build_pattern(
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    offsets: str,
    heads: str,
) -> DilatedPattern:
    """Validated pattern for ``num_heads`` heads; every ConfigError names the field to fix."""
    pattern = DilatedPattern.from_config(segment_lengths, dilation_rates, offsets, heads)
    pattern.check_heads(num_heads)
    return pattern


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-sum-exps are merged in at least fp32: bf16 weights would cost more error than the kernel."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_floor(dtype: torch.dtype) -> float:
    """A finite stand-in for log(0).

    With -inf, a position no pair selects makes the merge compute -inf - (-inf) = nan in
    the backward pass even where the forward masks it. A huge finite floor keeps every
    gradient finite and still gives such positions weight exp(floor - real) = 0.
    """
    return torch.finfo(dtype).min / 4


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each row.

    q, k, v: (..., L, D); ``allowed`` broadcasts to (..., L, L) or is None. Every row must
    keep at least one key (callers guarantee it), so no row normalises by zero.
    Returns out (..., L, D) in q's dtype and lse (..., L) in ``lse_dtype``.
    """
    acc = lse_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if causal:
        n = scores.shape[-1]
        upper = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(upper, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v.to(acc)).to(q.dtype)
    return out, lse


def _cpu_flash_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        ops, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


_CPU_FLASH = _cpu_flash_available()
_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def cpu_flash_ok(x: torch.Tensor) -> bool:
    """Whether torch's fused CPU flash kernel (which also returns the log-sum-exp) takes ``x``."""
    return _CPU_FLASH and x.device.type == "cpu" and x.dtype in _CPU_FLASH_DTYPES


def fused_ok(x: torch.Tensor) -> bool:
    """Whether a fused LSE kernel (``lse_kernel``) takes tensors like ``x``, on any device."""
    return lse_kernel(x) is not None


# -- fused kernels that return the log-sum-exp ----------------------------------------------
#
# Every call site that merges partial results by log-sum-exp (improved heads="all", dilated
# heads="all", the ring ops) goes through one ``LSEKernel``: a forward that returns
# (out, lse) and a backward that takes *any* (out, lse) consistent with the rows, which is
# what lets a caller hand it the merged ones (the ring-attention identity). Layout is the
# kernel's: (B', H, L, D) tensors whose last dimension is contiguous (other strides free),
# lse (B', H, L) fp32. CPU uses torch's fused flash kernel; CUDA the flash kernel for
# fp16/bf16 (head_dim a multiple of 8, at most 256) and the memory-efficient kernel
# otherwise or with a mask. dropout is always 0: the random-state tensors the CUDA
# backwards take are then never read, so empty ones stand in for the forward's.

_FLASH_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_EFFICIENT_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The memory-efficient kernel pads its lse to whole tiles of this many rows.
_EFFICIENT_LSE_TILE = 32
# ... and wants the rows of a bias aligned to this many elements.
_EFFICIENT_BIAS_ALIGN = 16


@dataclass(frozen=True)
class LSEKernel:
    """A fused attention kernel pair (see the comment above). ``masked``: takes a mask."""

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    masked: bool = False


def kernel_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the fused kernels take it: strided views pass as they are; only a last
    dimension that is not contiguous is copied (the one stride both kernels refuse)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_rng(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64, device=device)


def _cpu_forward(q, k, v, causal, scale, mask=None):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale
    )


def _cpu_backward(grad, q, k, v, out, lse, causal, scale, mask=None):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
    )


def _flash_forward(q, k, v, causal, scale, mask=None):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _flash_backward(grad, q, k, v, out, lse, causal, scale, mask=None):
    rng = _empty_rng(q.device)
    n_q, n_k = q.shape[-2], k.shape[-2]
    # cum_seq_q/k undefined (None), as the dense forward returns them: defined ones would
    # select the variable-length kernel.
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse.contiguous(), None, None, n_q, n_k, 0.0, causal, rng, rng, scale=scale
    )


def _efficient_forward(q, k, v, causal, scale, mask=None):
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, mask, True, 0.0, causal, scale=scale
    )
    return out, lse[..., : q.shape[-2]]


def _efficient_backward(grad, q, k, v, out, lse, causal, scale, mask=None):
    n = q.shape[-2]
    padded = -(-n // _EFFICIENT_LSE_TILE) * _EFFICIENT_LSE_TILE
    lse_p = lse.new_zeros((*lse.shape[:-1], padded))
    lse_p[..., :n] = lse
    rng = _empty_rng(q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, mask, out, lse_p, rng, rng, 0.0, [True, True, True, False], causal, scale=scale
    )
    return dq, dk, dv


CPU_FLASH = LSEKernel("cpu_flash", _cpu_forward, _cpu_backward, masked=True)
CUDA_FLASH = LSEKernel("cuda_flash", _flash_forward, _flash_backward)
CUDA_EFFICIENT = LSEKernel("cuda_efficient", _efficient_forward, _efficient_backward, masked=True)


def lse_kernel(x: torch.Tensor, masked: bool = False) -> LSEKernel | None:
    """The fused LSE kernel for tensors like ``x`` (kernel layout), or None: no fused kernel
    takes them (fp64 on CUDA, other devices), and the caller's portable path runs."""
    if x.device.type == "cpu":
        return CPU_FLASH if _CPU_FLASH and x.dtype in _CPU_FLASH_DTYPES else None
    if x.device.type != "cuda":
        return None
    d = x.shape[-1]
    if not masked and x.dtype in _FLASH_CUDA_DTYPES and d % 8 == 0 and d <= 256:
        return CUDA_FLASH
    if x.dtype in _EFFICIENT_CUDA_DTYPES:
        return CUDA_EFFICIENT
    return None


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (..., L, L) -> additive bias (0 / -inf) in ``dtype``, its rows padded in
    memory to the memory-efficient kernel's alignment (the view keeps the shape)."""
    n = allowed.shape[-1]
    padded = -(-n // _EFFICIENT_BIAS_ALIGN) * _EFFICIENT_BIAS_ALIGN
    bias = torch.full((*allowed.shape[:-1], padded), float("-inf"), dtype=dtype, device=allowed.device)
    bias[..., :n].masked_fill_(allowed, 0.0)
    return bias[..., :n]


class _MaskedLSE(torch.autograd.Function):
    """(out, lse) of masked attention through a fused kernel, both differentiable.

    The kernels' backwards take dO only; the lse's gradient enters through the same pass by
    widening the head dimension: q, k get a zero column (scores unchanged), v a column of
    ones, dO that column set to dlse, and out that column left 0. The kernel then computes
    dP = dO V^T + dlse and delta = rowsum(dO * O), so dS = P * (dO V^T - delta + dlse):
    exactly the gradient of out and lse together. The extra columns (padded to 8 for the
    CUDA kernels' alignment) are the whole cost.
    """

    @staticmethod
    def forward(ctx: Any, q, k, v, mask, kernel, scale):  # type: ignore[override]
        out, lse = kernel.forward(q, k, v, False, scale, mask)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.kernel, ctx.scale = kernel, scale
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out, grad_lse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is None:
            return (*ctx.kernel.backward(grad_out.contiguous(), q, k, v, out, lse, False, ctx.scale, mask),
                    None, None, None)
        d = q.shape[-1]
        pad = 8 - d % 8  # >= 1: one column carries dlse
        widen = lambda t: F.pad(t, (0, pad))
        v_w = widen(v)
        v_w[..., d] = 1.0
        g_w = widen(grad_out)
        g_w[..., d] = grad_lse.to(g_w.dtype)
        dq, dk, dv = ctx.kernel.backward(g_w, widen(q), widen(k), v_w, widen(out), lse, False, ctx.scale, mask)
        return dq[..., :d], dk[..., :d], dv[..., :d], None, None, None


def masked_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fused masked attention with its log-sum-exp, differentiable in both; None when no
    fused kernel takes these tensors (the caller then runs ``explicit_attention``).

    q, k, v: kernel layout (B', H, L, D); ``allowed`` bool, broadcastable to (B', H, L, L).
    Returns out (B', H, L, D) in q's dtype and lse (B', H, L) in ``lse_dtype``.
    """
    kernel = lse_kernel(q, masked=True)
    if kernel is None:
        return None
    shape = (*q.shape[:-1], k.shape[-2])
    mask = additive_mask(allowed, q.dtype).expand(shape)
    q, k, v = (kernel_input(t) for t in (q, k, v))
    out, lse = _MaskedLSE.apply(q, k, v, mask, kernel, scale)
    return out, lse.to(lse_dtype(q.dtype))
