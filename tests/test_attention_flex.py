"""``flex``: what is specific to it: its block tables, layouts, the lse merge, its cache keys.

Equality with the dense reference (eager and compiled paths, gradients on CUDA), the refused
CPU backward and every cache strategy are in tests/conformance/. Checks here use eager flex
(no compile; it returns the lse on CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from dilexp.attention import build
from dilexp.attention.reference import dense_reference
from dilexp.cache import build_cache, pattern_nbytes
from dilexp.errors import ConfigError
from dilexp.patterns.dilated import DilatedPattern
from dilexp.patterns.flex_plan import build_compact_plan, build_natural_plan

CONF = Path(__file__).resolve().parent.parent / "conf" / "attention" / "flex.yaml"
B, N, H, D, BLOCK = 2, 200, 5, 16, 32
# Several checks use eager flex on purpose (no compile; returns the lse on CPU).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _attn(seg: list[int], rates: list[int], offsets: str = "head", heads: str = "grouped", **kw: object):
    return build("flex", num_heads=H, head_dim=D, segment_lengths=seg, dilation_rates=rates, offsets=offsets,
                 heads=heads, block_size=BLOCK, **kw)


def forward_error(attn: torch.nn.Module, causal: bool, seed: int = 0, n: int = N, b: int = B) -> float:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, attn.num_heads, attn.head_dim, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = attn(q, k, v, causal=causal)
    ref = dense_reference(q.double(), k.double(), v.double(), attn.pattern.dense_multiplicity(n, attn.num_heads),
                          causal)
    assert out.shape == ref.shape and out.dtype == q.dtype
    return (out.double() - ref).abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_flex_lse_merge_matches_reference(causal: bool) -> None:
    # The lse merge is what heads="all" uses on CUDA. Eager flex returns the lse on CPU, so
    # the permutation and the merge are checked here with it.
    attn = _attn([32, 64, 100], [2, 4, 1], heads="all")
    attn._kernel, attn._lse_merge = flex_attention, True
    assert attn.mode("cpu") == "lse"
    assert forward_error(attn, causal, b=1) <= 1e-4


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("seg", "rates", "offsets", "heads"),
    [([32, 64, 128], [1, 2, 4], "head", "grouped"), ([48, 100], [3, 2], "group", "grouped"),
     ([32, 64], [2, 4], "head", "all"), ([24, 50], [1, 3], "head", "all")],
)
def test_closed_form_block_masks_equal_create_block_mask(seg, rates, offsets, heads, causal) -> None:
    # The block tables are derived, not evaluated; torch's evaluation of the same mask_mod
    # must give the same touched and full blocks.
    pattern = DilatedPattern.from_config(seg, rates, offsets, heads)
    cpu = torch.device("cpu")
    plans = [build_compact_plan(pattern, H, 150, BLOCK, causal, cpu)]
    if heads == "all":
        plans.append(build_natural_plan(pattern, H, 150, BLOCK, causal, cpu))
    for plan in plans:
        bm = plan.block_mask
        heads_v = bm.kv_num_blocks.shape[1]
        ref = create_block_mask(bm.mask_mod, None, heads_v, *bm.seq_lengths, device="cpu", BLOCK_SIZE=BLOCK)
        assert torch.equal(bm.to_dense(), ref.to_dense())
        assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)
        assert torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)


def test_compact_layout_has_only_full_blocks_when_runs_fill_blocks() -> None:
    # The point of permuting: with w / r a multiple of the block size nothing is partial,
    # while the natural order makes every visited block of a dilated head partial.
    pattern = DilatedPattern.from_config([128, 256], [2, 4], heads="all")
    cpu = torch.device("cpu")
    compact = build_compact_plan(pattern, 4, 512, 64, False, cpu).block_mask
    natural = build_natural_plan(pattern, 4, 512, 64, False, cpu).block_mask
    assert int(compact.kv_num_blocks.sum()) == 0 and int(compact.full_kv_num_blocks.sum()) > 0
    assert int(natural.full_kv_num_blocks.sum()) == 0 and int(natural.kv_num_blocks.sum()) > 0


def test_plans_come_from_the_cache_and_prepare_builds_them() -> None:
    cache = build_cache("local")
    attn = _attn([32, 64], [1, 2], cache=cache)
    attn._kernel = flex_attention
    attn.prepare(96, "cpu")
    assert cache.stats()["misses"] == 2
    plan = attn.plan(96, False, "cpu")
    assert pattern_nbytes(plan) >= pattern_nbytes(plan.block_mask.kv_indices) + pattern_nbytes(plan.perm)
    q = torch.randn(1, 96, H, D)
    attn(q, q, q, causal=True)
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 24}, "attention.block_size"),
        ({"block_size": 0}, "attention.block_size"),
        ({"dilation_rates": [1]}, "attention.dilation_rates"),
        ({"offsets": "x"}, "attention.offsets"),
        ({"segment_lengths": [4, 8, 16, 32, 64, 128], "dilation_rates": [1] * 6}, "model.n_head"),
    ],
)
def test_bad_config_fails_at_construction_naming_the_field(kwargs: dict, field: str) -> None:
    cfg = {"num_heads": H, "head_dim": D, "segment_lengths": [32, 64], "dilation_rates": [1, 2], **kwargs}
    with pytest.raises(ConfigError) as e:
        build("flex", **cfg)
    assert e.value.field == field


def test_default_config_is_valid_for_the_default_run() -> None:
    # conf/attention/flex.yaml with the default LM: seq_len 512, 4 heads, head_dim 32. The eager
    # kernel keeps this test free of another compile; the plan is what the yaml decides.
    cfg = OmegaConf.to_container(OmegaConf.load(CONF))
    name = cfg.pop("name")
    attn = build(name, num_heads=4, head_dim=32, **cfg)
    attn._kernel = flex_attention
    assert forward_error(attn, causal=True, n=512, b=1) <= 1e-4
    # Every segment's run (w / r = 64) fills whole blocks: no partial block without the causal
    # mask, and with it only the diagonal blocks.
    assert int(attn.plan(512, False, "cpu").block_mask.kv_num_blocks.sum()) == 0
    bm = attn.plan(512, True, "cpu").block_mask
    assert int(bm.kv_num_blocks.max()) == 1
    rows = torch.arange(bm.kv_indices.shape[2]).expand_as(bm.kv_indices[..., 0])
    has_partial = bm.kv_num_blocks == 1
    assert torch.equal(bm.kv_indices[..., 0][has_partial], rows[has_partial])

