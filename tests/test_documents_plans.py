"""Packed documents through per-layout plans (issue 18): dilated, improved, ring_v2, ring_v3.

Every check compares against the document-masked dense reference (values and gradients, fp64)
on random layouts: documents shorter than the smallest segment, longer than the largest,
spanning the ring's chunks (single process) and shards (two gloo ranks). The plans are one
cache entry per layout, their size does not grow with the number of documents, and the ring
skips block pairs no document connects.
"""

from __future__ import annotations

import json
import random
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from dilexp.attention import build
from dilexp.attention.reference import dense_reference, document_multiplicity
from dilexp.cache import build_cache
from dilexp.patterns.doc_plans import build_doc_plan
from dilexp.patterns.doc_ring import build_doc_ring
from dilexp.patterns.documents import DocumentLayout

H, DH = 4, 8
SEG, RATES = [3, 8, 16], [1, 2, 3]  # short segments pad (improved buckets by powers of two)
VARIANTS = ["dilated", "improved", "ring_v2", "ring_v3"]
RING_SETTINGS = [(1, "contiguous"), (3, "contiguous"), (4, "zigzag")]


def random_layout(rng: random.Random, batch: int, n: int) -> DocumentLayout:
    """Rows with 1..6 documents of any length (1 token up to the whole row)."""
    rows = []
    for _ in range(batch):
        cuts = sorted(rng.sample(range(1, n), min(rng.randint(0, 5), n - 1)))
        rows.append((0, *cuts))
    return DocumentLayout(n, tuple(rows))


def _build(name: str, heads: str, chunks: int = 1, placement: str = "contiguous", **kw: Any) -> Any:
    extra = {"chunks": chunks, "placement": placement} if name.startswith("ring") else {}
    return build(name, num_heads=H, head_dim=DH, segment_lengths=SEG, dilation_rates=RATES, heads=heads, **extra, **kw)


def _errors(attn: Any, lay: DocumentLayout, causal: bool, seed: int) -> tuple[float, float, float]:
    """(value error, gradient error, distance of the reference from the no-document one)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(lay.batch, lay.n, H, DH, dtype=torch.float64, generator=gen) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = attn(q, k, v, causal=causal, docs=lay)
    ref = dense_reference(q, k, v, document_multiplicity(attn, lay), causal=causal)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    plain = dense_reference(q, k, v, attn.dense_multiplicity(lay.n), causal=causal)
    return ((out - ref).abs().max().item(), max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)),
            (plain - ref).abs().max().item())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", ["grouped", "all"])
@pytest.mark.parametrize("name", VARIANTS)
def test_equals_document_masked_reference(name: str, heads: str, causal: bool) -> None:
    rng = random.Random(hash((name, heads, causal)) % 1000)
    settings = RING_SETTINGS if name.startswith("ring") else [(1, "contiguous")]
    moved = 0.0
    for i in range(4):
        for chunks, placement in settings:
            lay = random_layout(rng, 2, rng.randint(6, 40))
            attn = _build(name, heads, chunks, placement)
            err, gerr, dist = _errors(attn, lay, causal, seed=i)
            assert err < 1e-10 and gerr < 1e-10, (name, heads, causal, chunks, placement, lay.rows, err, gerr)
            moved = max(moved, dist)
    assert moved > 1e-3  # the layouts did change the function


def test_edge_layouts() -> None:
    """One-token documents, documents shorter than the smallest segment, one longer than the
    largest, and rows that differ, for every variant."""
    lay = DocumentLayout(30, ((0, 1, 2, 3, 20), (0, 29), (0, 5, 6)))
    for name in VARIANTS:
        for causal in (False, True):
            err, gerr, _ = _errors(_build(name, "grouped", chunks=4), lay, causal, seed=3)
            assert err < 1e-10 and gerr < 1e-10, (name, causal, err, gerr)


def test_fp32_fused_inputs_match() -> None:
    """The training dtype: fp32 through the same plans (SDPA's fused CPU kernel in improved)."""
    torch.manual_seed(0)
    lay = DocumentLayout(64, ((0, 10, 50), (0, 33)))
    q, k, v = (torch.randn(2, 64, H, DH) for _ in range(3))
    for name in VARIANTS:
        attn = _build(name, "grouped", chunks=2)
        ref = dense_reference(q.double(), k.double(), v.double(), document_multiplicity(attn, lay), causal=True)
        assert (attn(q, k, v, causal=True, docs=lay).double() - ref).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("name", VARIANTS)
def test_one_document_per_row_is_no_layout(name: str) -> None:
    torch.manual_seed(1)
    attn = _build(name, "grouped", chunks=2)
    q, k, v = (torch.randn(2, 20, H, DH) for _ in range(3))
    assert torch.equal(attn(q, k, v, causal=True, docs=DocumentLayout.single(2, 20)), attn(q, k, v, causal=True))


@pytest.mark.parametrize("name", VARIANTS)
def test_one_build_per_layout_for_all_layers(name: str) -> None:
    """Layers sharing the run's cache: the first builds the layout's plan, every other call hits."""
    cache = build_cache("local")
    layers = [_build(name, "grouped", chunks=2, cache=cache) for _ in range(3)]
    lay = DocumentLayout(24, ((0, 7), (0, 3, 15)))
    x = torch.randn(2, 24, H, DH)
    for attn in layers:
        attn(x, x, x, causal=True, docs=lay)
    stats = cache.stats()
    assert stats["misses"] == 1 and stats["hits"] == 2, stats
    layers[0](x, x, x, causal=True, docs=DocumentLayout(24, ((0, 8), (0, 3, 15))))  # a new layout: one build
    assert cache.stats()["misses"] == 2


def test_plan_size_does_not_grow_with_documents() -> None:
    """No per-document work on the hot path: the calls of a plan are bounded by branches x
    buckets (dilated, improved) or block pairs x branches (ring), however many documents."""
    from dilexp.patterns.dilated import DilatedPattern

    pattern = DilatedPattern((8, 16, 32), (1, 2, 4))
    n = 512
    few = DocumentLayout(n, ((0, 200),))
    many = DocumentLayout(n, (tuple(range(0, n, 9)),))  # 57 documents of 9 tokens (one of 8)
    for lay in (few, many):
        for bucketed in (False, True):
            plan = build_doc_plan(pattern, lay, 3, causal=True, bucketed=bucketed)
            calls = sum(len(buckets) for _, buckets in plan)
            assert calls <= 3 * (1 if not bucketed else 6), (lay.num_documents, bucketed, calls)
        ring = build_doc_ring(pattern.branches(3), lay, 1, 0, 4, "contiguous", True)
        assert len(ring.plan.ops()) <= len(ring.layout.pairs[0]) * 3


def test_ring_skips_pairs_no_document_connects() -> None:
    """Documents inside chunks: a pattern whose segments span the whole row connects only each
    chunk with itself; a document spanning two chunks connects them (causal: one way)."""
    attn = build("ring_v2", num_heads=2, head_dim=DH, segment_lengths=[64], dilation_rates=[1], chunks=4)
    x = torch.randn(1, 32, 2, DH)
    inside = DocumentLayout(32, ((0, 8, 16, 24),))
    entry = attn.doc_plan(inside, True, None, "cpu")
    assert sorted(entry.layout.pairs[0]) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    spanning = DocumentLayout(32, ((0, 4, 12, 24),))  # [4, 12) spans chunks 0 and 1, [12, 24) chunks 1 and 2
    assert sorted(attn.doc_plan(spanning, True, None, "cpu").layout.pairs[0]) == [(0, 0), (1, 0), (1, 1), (2, 1),
                                                                                   (2, 2), (3, 3)]
    attn.reset_ring_stats()
    attn(x, x, x, causal=True, docs=inside)
    assert attn.ring_stats()["skipped_steps"] == 12  # 16 pairs visited, 4 computed
    plain = dense_reference(x.double(), x.double(), x.double(), document_multiplicity(attn, inside), causal=True)
    assert (attn(x, x, x, causal=True, docs=inside).double() - plain).abs().max().item() < 1e-5


def test_ring_layout_must_describe_the_global_sequence() -> None:
    attn = _build("ring_v2", "grouped")
    x = torch.randn(1, 16, H, DH)
    with pytest.raises(ValueError, match="layout is for"):
        attn(x, x, x, docs=DocumentLayout(12, ((0, 5),)))


# -- two gloo ranks: documents spanning shards ------------------------------------------------


def _gloo_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    result: dict[str, Any] = {"cases": [], "error": None}
    try:
        from dilexp import distributed as D

        D.init_process_group(rank, world, backend="gloo", store_path=store, timeout_s=30.0)
        rng = random.Random(7)
        n = 36
        layouts = [random_layout(rng, 2, n) for _ in range(3)]
        layouts.append(DocumentLayout(n, ((0, 10, 20), (0, 17, 30))))  # documents across the shard boundary
        cases = [(lay, name, causal, chunks, placement)
                 for i, lay in enumerate(layouts)
                 for name, causal, chunks, placement in [("ring_v2", i % 2 == 0, 1 + i % 2, "contiguous"),
                                                         ("ring_v3", i % 2 == 1, 2, "zigzag")]]
        # Documents that stop at the shard boundary: nothing needs to travel.
        cases.append((DocumentLayout(n, ((0, 18), (0, 9, 18))), "ring_v2", True, 1, "contiguous"))
        for lay, name, causal, chunks, placement in cases:
            attn = build(name, num_heads=H, head_dim=DH, segment_lengths=[4, 16, 64], dilation_rates=[1, 2, 3],
                         chunks=chunks, placement=placement, seq_len=n)
            gen = torch.Generator().manual_seed(len(result["cases"]))
            q, k, v, g = (torch.randn(2, n, H, DH, dtype=torch.float64, generator=gen) for _ in range(4))
            mine = [D.shard_sequence(x, rank, world, placement).clone().requires_grad_() for x in (q, k, v)]
            out = attn(*mine, causal=causal, docs=lay)
            out.backward(D.shard_sequence(g, rank, world, placement))
            full = [x.clone().requires_grad_() for x in (q, k, v)]
            ref = dense_reference(*full, document_multiplicity(attn, lay), causal)
            ref.backward(g)
            shard = [D.shard_sequence(x.grad, rank, world, placement) for x in full]
            result["cases"].append({
                "label": f"{name} causal={causal} chunks={chunks} {placement} {lay.rows}",
                "fwd": (out - D.shard_sequence(ref, rank, world, placement)).abs().max().item(),
                "bwd": max((a.grad - b).abs().max().item() for a, b in zip(mine, shard, strict=True)),
                "bytes_sent": attn.ring_stats()["bytes_sent"],
            })
        D.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_ranks_documents_spanning_shards(gloo_group) -> None:
    results = gloo_group(_gloo_worker, 2, deadline_s=150.0)
    for r, res in enumerate(results):
        for c in res["cases"]:
            assert c["fwd"] < 1e-10 and c["bwd"] < 1e-10, (r, c)
        assert any(c["bytes_sent"] > 0 for c in res["cases"][:-1])  # documents across shards do travel
        assert res["cases"][-1]["bytes_sent"] == 0, (r, res["cases"][-1])
    json.dumps(results)


@pytest.mark.parametrize("path", ["fused", "portable"])
def test_improved_paths_over_documents(path: str) -> None:
    """improved's fused document node (causal, no masks) and its autograd path agree with the reference."""
    rng = random.Random(5)
    for causal in (False, True):
        attn = _build("improved", "grouped")
        attn.use_path(path)
        lay = random_layout(rng, 3, 50)
        err, gerr, _ = _errors(attn, lay, causal, seed=11)
        assert err < 1e-10 and gerr < 1e-10, (path, causal, lay.rows, err, gerr)
