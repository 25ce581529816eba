"""Helpers shared by the dilated variants: validation, head selection, log-sum-exp merging."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from dilexp.errors import ConfigError
from dilexp.patterns.dilated import DilatedPattern
from dilexp.patterns.strided import heads_index

__all__ = ["build_pattern", "check_dims", "cpu_flash_ok", "explicit_attention", "heads_index", "lse_dtype", "lse_floor"]


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
    """Whether torch's fused CPU flash kernel (which also returns the log-sum-exp) takes ``x``.

    CUDA and other devices use the variants' portable paths.
    """
    return _CPU_FLASH and x.device.type == "cpu" and x.dtype in _CPU_FLASH_DTYPES
