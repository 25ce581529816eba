"""``improved`` against the float64 dense reference (both its CPU-fused and portable paths)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_check import max_errors

from dilexp.attention import build
from dilexp.attention.improved import plan_branches
from dilexp.attention.reference import dense_reference
from dilexp.cache import build_cache
from dilexp.memory.base import NoPool
from dilexp.patterns.dilated import DilatedPattern

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    pytest.param(2, 24, 4, 8, [8, 16], [1, 2], id="multiples"),
    pytest.param(2, 21, 5, 8, [4, 8, 64], [1, 2, 3], id="ragged-w>=N-H%m"),
    pytest.param(1, 13, 3, 4, [2, 5, 3], [4, 2, 1], id="rate>length"),
    pytest.param(2, 10, 4, 8, [8], [4], id="empty-tail"),
    pytest.param(2, 18, 3, 8, [6, 9, 18], [3, 2, 4], id="w%r!=0"),
]


def _build(h: int, d: int, seg: list[int], rates: list[int], fused: bool = True, **kw) -> tuple:
    attn = build("improved", num_heads=h, head_dim=d, segment_lengths=seg, dilation_rates=rates, **kw)
    attn.use_cpu_flash = fused
    return attn, DilatedPattern.from_config(seg, rates, **{k: v for k, v in kw.items() if k != "pool"})


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "portable"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", ["grouped", "all"])
@pytest.mark.parametrize("offsets", ["head", "group"])
@pytest.mark.parametrize(("b", "n", "h", "d", "seg", "rates"), CASES)
def test_improved_matches_reference(b, n, h, d, seg, rates, offsets, heads, causal, fused) -> None:
    attn, pattern = _build(h, d, seg, rates, fused, offsets=offsets, heads=heads)
    assert torch.equal(attn.dense_multiplicity(n), pattern.dense_multiplicity(n, h))
    fwd, bwd = max_errors(attn, pattern, b, n, causal)
    assert fwd <= 1e-4 and bwd <= 1e-4, (fwd, bwd)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "portable"])
@pytest.mark.parametrize("heads", ["grouped", "all"])
def test_improved_takes_strided_inputs(heads: str, fused: bool) -> None:
    attn, pattern = _build(4, 8, [4, 8], [1, 2], fused, heads=heads)
    fwd, bwd = max_errors(attn, pattern, 2, 14, causal=True, layout="qkv")
    assert fwd <= 1e-4 and bwd <= 1e-4, (fwd, bwd)


@pytest.mark.parametrize("heads", ["grouped", "all"])
def test_improved_bf16_within_design_tolerance(heads: str) -> None:
    attn, pattern = _build(4, 16, [8, 16], [1, 2], heads=heads)
    fwd, _ = max_errors(attn, pattern, 1, 20, causal=True, dtype=torch.bfloat16)
    assert fwd <= 2e-2


def test_reference_comparison_catches_a_wrong_pattern() -> None:
    attn, _ = _build(4, 8, [4, 8], [1, 2], offsets="head")
    wrong = DilatedPattern.from_config([4, 8], [1, 2], offsets="group")
    fwd, _ = max_errors(attn, wrong, 1, 16, causal=False)
    assert fwd > 1e-2


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "portable"])
def test_unselected_positions_are_exactly_zero_even_in_a_dirty_buffer(fused: bool) -> None:
    class DirtyPool(NoPool):
        """Hands out NaN-filled buffers, as a reusing pool may hand out stale ones."""

        def empty(self, shape, dtype, device):  # type: ignore[override]
            return super().empty(shape, dtype, device).fill_(float("nan"))

    for heads in ("grouped", "all"):
        attn, _ = _build(2, 4, [4, 8], [1, 4], fused, heads=heads, pool=DirtyPool())
        q, k, v = (torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3))
        out = attn(q, k, v, causal=True)
        # Head 1 (offset 1 mod 4) is selected at 1 and 5 only (under "all" also by the rate-1 pair).
        if heads == "grouped":
            assert torch.all(out[0, [0, 2, 3, 4, 6, 7], 1] == 0)
        assert not torch.isnan(out).any()
        out.sum().backward()
        assert not any(torch.isnan(x.grad).any() for x in (q, k, v))


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


def test_prepare_makes_the_first_call_a_hit() -> None:
    cache = build_cache("local")
    attn = build("improved", num_heads=4, head_dim=8, segment_lengths=[4, 8], dilation_rates=[1, 2],
                 cache=cache)
    attn.prepare(19, "cpu")
    misses = cache.stats()["misses"]
    q = torch.randn(1, 19, 4, 8)
    attn(q, q, q, causal=True)
    assert cache.stats()["misses"] == misses and cache.stats()["hits"] >= 1


def test_inference_mode_works() -> None:
    attn, pattern = _build(4, 8, [4, 8], [1, 2], heads="all")
    q, k, v = (torch.randn(1, 12, 4, 8) for _ in range(3))
    with torch.inference_mode():
        out = attn(q, k, v, causal=True)
    ref = dense_reference(q, k, v, pattern.dense_multiplicity(12, 4), causal=True)
    assert (out - ref).abs().max() <= 1e-4


@st.composite
def small_configs(draw: st.DrawFn) -> dict:
    m = draw(st.integers(1, 3))
    heads = draw(st.sampled_from(["grouped", "all"]))
    return {
        "seg": draw(st.lists(st.integers(1, 12), min_size=m, max_size=m)),
        "rates": draw(st.lists(st.integers(1, 5), min_size=m, max_size=m)),
        "h": draw(st.integers(m if heads == "grouped" else 1, 6)),
        "n": draw(st.integers(1, 20)),
        "b": draw(st.integers(1, 2)),
        "offsets": draw(st.sampled_from(["head", "group"])),
        "heads": heads,
        "causal": draw(st.booleans()),
        "fused": draw(st.booleans()),
    }


@settings(max_examples=30, deadline=None)
@given(small_configs())
def test_improved_property_random_configs(c: dict) -> None:
    attn, pattern = _build(c["h"], 4, c["seg"], c["rates"], c["fused"],
                           offsets=c["offsets"], heads=c["heads"])
    fwd, bwd = max_errors(attn, pattern, c["b"], c["n"], c["causal"])
    assert fwd <= 1e-4 and bwd <= 1e-4
