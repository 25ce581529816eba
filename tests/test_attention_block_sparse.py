"""``block_sparse``: its pattern against the written-out definition, its plans and cache keys.

Equality with the dense reference, settings and caches: tests/conformance/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dilexp.attention import build
from dilexp.cache import build_cache
from dilexp.patterns.block_sparse import BlockSparsePattern

CONF = Path(__file__).resolve().parent.parent / "conf" / "attention" / "block_sparse.yaml"


def naive_layout(nb: int, local: int, dilation: int, glob: int) -> torch.Tensor:
    """The module docstring's definition, one pair at a time."""
    out = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        for j in range(nb):
            out[i, j] = (
                abs(i - j) <= local
                or (dilation >= 1 and (i - j) % dilation == 0)
                or i < glob
                or j < glob
            )
    return out


LAYOUTS = [(1, 2, 1), (0, 3, 2), (2, 0, 0), (0, 1, 0), (1, 5, 3), (0, 0, 0)]


@pytest.mark.parametrize(("local", "dilation", "glob"), LAYOUTS)
@pytest.mark.parametrize("n", [1, 7, 64, 100])
def test_block_layout_and_dense_mask_follow_the_definition(n: int, local: int, dilation: int, glob: int) -> None:
    p = BlockSparsePattern.from_config(8, local, dilation, glob)
    nb = -(-n // 8)
    expected = naive_layout(nb, local, dilation, glob)
    assert torch.equal(p.block_layout(n), expected)
    mult = p.dense_multiplicity(n, 3)
    assert mult.shape == (3, n, n) and mult.dtype == torch.int64
    for qpos in range(n):
        for kpos in range(0, n, 3):
            assert mult[1, qpos, kpos] == int(expected[qpos // 8, kpos // 8])
    assert torch.equal(mult[0], mult[2])


@pytest.mark.parametrize(("local", "dilation", "glob"), LAYOUTS)
@pytest.mark.parametrize("nb", [1, 5, 16, 33])
def test_closed_form_sparsity_equals_the_layout(nb: int, local: int, dilation: int, glob: int) -> None:
    p = BlockSparsePattern.from_config(4, local, dilation, glob)
    n = nb * 4 - 1
    dense_fraction = p.block_layout(n).double().mean().item()
    assert p.achieved_sparsity(n) == pytest.approx(1.0 - dense_fraction, abs=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("local", "dilation", "glob"), LAYOUTS[:3])
@pytest.mark.parametrize("n", [1, 9, 40, 61])
def test_closed_form_pair_count_equals_the_dense_mask(n: int, local: int, dilation: int, glob: int,
                                                       causal: bool) -> None:
    attn = build("block_sparse", num_heads=3, head_dim=4, block_size=8, local_blocks=local, dilation=dilation,
                 global_blocks=glob)
    mult = attn.dense_multiplicity(n)
    expected = int((torch.tril(mult) if causal else mult).sum())
    assert attn.allowed_pairs(n, causal) == expected


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.8, 0.95])
def test_sparsity_picks_the_closest_stride(target: float) -> None:
    n, bs = 2000, 32
    p = BlockSparsePattern.from_config(bs, 1, 2, 1, sparsity=target)
    nb = p.num_blocks(n)
    candidates = {d: 1.0 - naive_layout(nb, 1, d, 1).double().mean().item() for d in [0, *range(1, nb + 1)]}
    best_gap = min(abs(s - target) for s in candidates.values())
    got = p.resolved_dilation(n)
    assert abs(candidates[got] - target) == pytest.approx(best_gap, abs=1e-12)
    assert p.achieved_sparsity(n) == pytest.approx(candidates[got], abs=1e-12)
    if target == 0.0:
        assert got == 1  # stride 1 is every block: dense


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [64, 77])
def test_plan_visits_each_allowed_block_pair_exactly_once(n: int, causal: bool) -> None:
    # "Computed only on non-empty blocks": the gathered, unmasked slots are the layout.
    p = BlockSparsePattern.from_config(8, 1, 3, 1)
    layout = p.block_layout(n)
    if causal:
        layout = torch.tril(layout)
    seen = torch.zeros_like(layout, dtype=torch.int64)
    perm, inv, buckets = p.plan(n, causal)
    rows_all = []
    for rows, cols, mask, bag_order, bag_offsets in buckets:
        rows_all.append(rows)
        width = cols.shape[1]
        for r_i, row in enumerate(rows.tolist()):
            for s in range(width):
                slot_open = True if mask is None else bool(mask[r_i, :, s * 8:(s + 1) * 8].any())
                if slot_open:
                    seen[row, cols[r_i, s]] += 1
        # The backward's gather-sum must equal the scatter-add it replaces.
        g = torch.randn(cols.numel(), 3)
        summed = torch.nn.functional.embedding_bag(bag_order, g, bag_offsets, mode="sum")
        assert torch.allclose(summed, torch.zeros(layout.shape[0], 3).index_add_(0, cols.flatten(), g), atol=1e-6)
    assert torch.equal(seen, layout.to(torch.int64))
    order = torch.cat(rows_all)
    assert sorted(order.tolist()) == list(range(layout.shape[0]))
    if perm is None:
        assert torch.equal(order, torch.arange(layout.shape[0])) and inv is None
    else:
        assert torch.equal(order, perm) and torch.equal(perm[inv], torch.arange(layout.shape[0]))


def test_plans_come_from_the_cache_and_prepare_builds_them() -> None:
    cache = build_cache("local")
    attn = build("block_sparse", num_heads=2, head_dim=8, block_size=8, cache=cache)
    attn.prepare(37, "cpu")
    assert cache.stats()["misses"] == 2  # one plan per mask
    assert cache.stats()["bytes"] > 0
    q = torch.randn(1, 37, 2, 8)
    for causal in (False, True, False):
        attn(q, q, q, causal=causal)
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 3
    keys = cache.keys()
    assert all(key[0] == "block_sparse" and key[1] == 37 for key in keys)


def test_sparsity_setting_changes_the_cache_key_through_the_stride() -> None:
    cache = build_cache("local")
    attn = build("block_sparse", num_heads=1, head_dim=4, block_size=4, sparsity=0.7, cache=cache)
    q = torch.randn(1, 200, 1, 4)
    attn(q, q, q)
    (key,) = cache.keys()
    assert key[4] == attn.pattern.resolved_dilation(200) != attn.pattern.dilation
