"""``improved``: what is specific to it (strided-view plans, buffers from the pool).

Equality with the dense reference on both paths: tests/conformance/."""

from __future__ import annotations

import pytest
import torch

from dilexp.attention import build
from dilexp.memory.base import NoPool
from dilexp.patterns.dilated import DilatedPattern
from dilexp.patterns.strided import plan_branches

pytestmark = pytest.mark.usefixtures("one_thread")

def _build(h: int, d: int, seg: list[int], rates: list[int], fused: bool = True, **kw) -> tuple:
    attn = build("improved", num_heads=h, head_dim=d, segment_lengths=seg, dilation_rates=rates, **kw)
    attn.use_cpu_flash = fused
    return attn, DilatedPattern.from_config(seg, rates, **{k: v for k, v in kw.items() if k != "pool"})


def test_output_buffers_come_from_the_pool() -> None:
    pool = NoPool()  # counts requests
    attn, _ = _build(4, 8, [4, 8], [1, 2], pool=pool)
    q = torch.randn(1, 16, 4, 8, requires_grad=True)
    attn(q, q, q, causal=True).sum().backward()
    # The output forward, the three gradients backward.
    assert pool.stats()["requests"] >= 4


def test_plan_is_strided_views_at_most_two_calls_per_branch() -> None:
    pattern = DilatedPattern.from_config([2048, 4096, 8192], [1, 2, 4], offsets="group")
    plans = plan_branches(pattern, 16384, 8)
    assert len(plans) == 3  # "group" offsets: one branch per group
    assert all(len(p.pieces) == 1 for p in plans)  # N % w == 0: no tail call
    ragged = plan_branches(pattern, 10000, 8)
    assert all(1 <= len(p.pieces) <= 2 for p in ragged)

