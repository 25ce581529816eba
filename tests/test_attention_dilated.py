"""``dilated`` (and the ``sdpa`` baseline) against the float64 dense reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_check import max_errors

from dilexp.attention import build
from dilexp.cache import build_cache
from dilexp.errors import ConfigError
from dilexp.patterns.dilated import DilatedPattern

pytestmark = pytest.mark.usefixtures("one_thread")

# (B, N, H, D, segment_lengths, dilation_rates): each row covers an edge of the pattern.
CASES = [
    pytest.param(2, 24, 4, 8, [8, 16], [1, 2], id="multiples"),
    pytest.param(2, 21, 5, 8, [4, 8, 64], [1, 2, 3], id="ragged-w>=N-H%m"),
    pytest.param(1, 13, 3, 4, [2, 5, 3], [4, 2, 1], id="rate>length"),
    pytest.param(2, 10, 4, 8, [8], [4], id="empty-tail"),
]


def _build(name: str, h: int, d: int, seg: list[int], rates: list[int], **kw: str) -> tuple:
    attn = build(name, num_heads=h, head_dim=d, segment_lengths=seg, dilation_rates=rates, **kw)
    return attn, DilatedPattern.from_config(seg, rates, **kw)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", ["grouped", "all"])
@pytest.mark.parametrize("offsets", ["head", "group"])
@pytest.mark.parametrize(("b", "n", "h", "d", "seg", "rates"), CASES)
def test_dilated_matches_reference(b, n, h, d, seg, rates, offsets, heads, causal) -> None:
    attn, pattern = _build("dilated", h, d, seg, rates, offsets=offsets, heads=heads)
    assert torch.equal(attn.dense_multiplicity(n), pattern.dense_multiplicity(n, h))
    fwd, bwd = max_errors(attn, pattern, b, n, causal)
    assert fwd <= 1e-4 and bwd <= 1e-4, (fwd, bwd)


@pytest.mark.parametrize("heads", ["grouped", "all"])
def test_dilated_bf16_within_design_tolerance(heads: str) -> None:
    attn, pattern = _build("dilated", 4, 16, [8, 16], [1, 2], heads=heads)
    fwd, _ = max_errors(attn, pattern, 1, 20, causal=True, dtype=torch.bfloat16)
    assert fwd <= 2e-2


def test_reference_comparison_catches_a_wrong_pattern() -> None:
    # The check must be able to fail: "head" and "group" offsets differ here.
    attn, _ = _build("dilated", 4, 8, [4, 8], [1, 2], offsets="head")
    wrong = DilatedPattern.from_config([4, 8], [1, 2], offsets="group")
    fwd, _ = max_errors(attn, wrong, 1, 16, causal=False)
    assert fwd > 1e-2


def test_unselected_positions_are_exactly_zero() -> None:
    attn, pattern = _build("dilated", 2, 4, [4, 8], [1, 4])
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    out = attn(q, k, v, causal=True)
    # Head 1 (offset 1 mod 4) selects positions 1 and 5 only.
    unselected = [p for p in range(8) if p not in (1, 5)]
    assert torch.all(out[0, unselected, 1] == 0)
    assert torch.all(out[0, [1, 5], 1] != 0)


def test_prepare_builds_every_pattern_through_the_cache() -> None:
    cache = build_cache("local")
    attn = build("dilated", num_heads=4, head_dim=8, segment_lengths=[4, 8], dilation_rates=[1, 2],
                 cache=cache)
    attn.prepare(19, "cpu")
    misses = cache.stats()["misses"]
    assert misses > 0
    q = torch.randn(1, 19, 4, 8)
    for causal in (False, True):
        attn(q, q, q, causal=causal)
    assert cache.stats()["misses"] == misses
    assert cache.stats()["hits"] > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"segment_lengths": [4, 8], "dilation_rates": [1]}, "attention.dilation_rates"),
        ({"segment_lengths": [4, -1], "dilation_rates": [1, 2]}, "attention.segment_lengths"),
        ({"segment_lengths": [4, 8], "dilation_rates": [0, 2]}, "attention.dilation_rates"),
        ({"segment_lengths": [4, 8], "dilation_rates": [1, 2], "offsets": "x"}, "attention.offsets"),
        ({"segment_lengths": [4, 8], "dilation_rates": [1, 2], "heads": "x"}, "attention.heads"),
        ({"segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4], "num_heads": 2}, "model.n_head"),
        ({"segment_lengths": [4], "dilation_rates": [1], "head_dim": 0}, "model.head_dim"),
        ({"segment_lengths": [4], "dilation_rates": [1], "head_dim": 6.5}, "model.head_dim"),
        ({"segment_lengths": [4], "dilation_rates": [1], "num_heads": True}, "model.n_head"),
        ({"segment_lengths": [4], "dilation_rates": [1], "window": 3}, "attention.window"),
    ],
)
@pytest.mark.parametrize("name", ["dilated", "improved"])
def test_bad_config_fails_at_construction_naming_the_field(name: str, kwargs: dict, field: str) -> None:
    cfg = {"num_heads": 4, "head_dim": 8, **kwargs}
    with pytest.raises(ConfigError) as e:
        build(name, **cfg)
    assert e.value.field == field


def test_default_config_is_valid_for_the_default_run() -> None:
    # conf/attention/dilated.yaml with the tiny LM (4 heads, seq_len 512).
    attn = build("dilated", num_heads=4, head_dim=8, segment_lengths=[64, 128, 256], dilation_rates=[1, 2, 4],
                 offsets="head", heads="grouped")
    q = torch.randn(1, 512, 4, 8)
    assert attn(q, q, q, causal=True).shape == q.shape


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_is_full_attention(causal: bool) -> None:
    attn = build("sdpa", num_heads=3, head_dim=8)
    full = DilatedPattern.from_config([64], [1], heads="all")  # one segment, rate 1: everything
    assert torch.equal(attn.dense_multiplicity(11), full.dense_multiplicity(11, 3))
    fwd, bwd = max_errors(attn, full, 2, 11, causal)
    assert fwd <= 1e-4 and bwd <= 1e-4


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
    }


@settings(max_examples=25, deadline=None)
@given(small_configs())
def test_dilated_property_random_configs(c: dict) -> None:
    attn, pattern = _build("dilated", c["h"], 4, c["seg"], c["rates"], offsets=c["offsets"], heads=c["heads"])
    fwd, bwd = max_errors(attn, pattern, c["b"], c["n"], c["causal"])
    assert fwd <= 1e-4 and bwd <= 1e-4
