"""Packed documents (issue 18): the layout object, the document-masked reference, the generic
exact path every variant has, and the ``docs=`` keyword."""

from __future__ import annotations

import pytest
import torch

from dilexp.attention import build
from dilexp.attention.reference import dense_reference, document_multiplicity
from dilexp.patterns.documents import DocumentLayout, as_layout


def test_layout_from_doc_ids_round_trips() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    lay = DocumentLayout.from_doc_ids(ids)
    assert lay.n == 6 and lay.rows == ((0, 2, 5), (0,))
    assert lay.spans(0) == [(0, 2), (2, 5), (5, 6)] and lay.spans(1) == [(0, 6)]
    assert torch.equal(lay.doc_ids(), ids)
    assert lay.positions().tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert not lay.same_for_all_rows and not lay.trivial
    assert DocumentLayout.from_cu_seqlens(lay.cu_seqlens(), 6) == lay
    assert DocumentLayout.from_cu_seqlens([0, 2, 5, 6, 12], 6) == lay
    # equal layouts share a cache key; ids need only change at boundaries
    assert DocumentLayout.from_doc_ids(ids + 7).key == lay.key and hash(lay) == hash(DocumentLayout(6, lay.rows))
    assert as_layout(DocumentLayout.single(3, 6)) is None and as_layout(lay) is lay


@pytest.mark.parametrize("rows", [((0, 8),), ((0, 0),), ((1,),), ((0, 5, 3),), ()])
def test_layout_rejects_bad_starts(rows: tuple) -> None:
    with pytest.raises(ValueError):
        DocumentLayout(8, rows)


def test_layout_rejects_document_across_rows() -> None:
    with pytest.raises(ValueError, match="row boundary"):
        DocumentLayout.from_cu_seqlens([0, 5, 8], 4)


@pytest.mark.parametrize("causal", [False, True])
def test_generic_path_equals_document_masked_reference(causal: bool) -> None:
    """The base class's per-document path on a variant with no fast path of its own, against
    the block-diagonal reference built from the variant's own multiplicity per length."""
    torch.manual_seed(0)
    attn = build("dilated", num_heads=2, head_dim=4, segment_lengths=[2, 4], dilation_rates=[1, 2])
    lay = DocumentLayout(10, ((0, 1, 4), (0, 7)))
    q, k, v = (torch.randn(2, 10, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attn(q, k, v, causal=causal, docs=lay)
    ref = dense_reference(q, k, v, document_multiplicity(attn, lay), causal=causal)
    assert (out - ref).abs().max().item() < 1e-10
    # and it is not the reference without documents
    plain = dense_reference(q, k, v, attn.dense_multiplicity(10), causal=causal)
    assert (plain - ref).abs().max().item() > 1e-3
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    assert max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)) < 1e-10


def test_trivial_layout_is_no_layout() -> None:
    torch.manual_seed(1)
    attn = build("sdpa", num_heads=2, head_dim=4)
    q, k, v = (torch.randn(3, 7, 2, 4) for _ in range(3))
    assert torch.equal(attn(q, k, v, causal=True, docs=DocumentLayout.single(3, 7)), attn(q, k, v, causal=True))


def test_layout_must_match_the_batch() -> None:
    attn = build("sdpa", num_heads=1, head_dim=4)
    q = torch.randn(1, 7, 1, 4)
    with pytest.raises(ValueError, match="layout is for"):
        attn(q, q, q, docs=DocumentLayout(8, ((0, 3),)))


# -- flex: one BlockMask per layout ---------------------------------------------------------

FLEX_LAYOUT = DocumentLayout(150, ((0, 5, 40, 41, 120), (0, 100)))


def _flex(heads: str, seg: list[int], rates: list[int]):  # type: ignore[no-untyped-def]
    return build("flex", num_heads=5, head_dim=16, segment_lengths=seg, dilation_rates=rates, heads=heads,
                 block_size=16)


def _flex_error(attn, layout: DocumentLayout, causal: bool) -> float:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(layout.batch, layout.n, 5, 16, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = attn(q, k, v, causal=causal, docs=layout)
    ref = dense_reference(q.double(), k.double(), v.double(), document_multiplicity(attn, layout), causal)
    return (out.double() - ref).abs().max().item()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads", "seg", "rates"), [("grouped", [16, 32, 64], [1, 2, 4]), ("all", [24, 50], [1, 3])])
def test_flex_document_block_tables_equal_create_block_mask(heads: str, seg: list[int], rates: list[int],
                                                            causal: bool) -> None:
    """The per-layout block tables are derived; torch's evaluation of the same mask_mod (with
    a row per batch row) must give the same touched and full blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    from dilexp.patterns.dilated import DilatedPattern
    from dilexp.patterns.flex_documents import build_document_compact_plan, build_document_natural_plan

    pattern = DilatedPattern.from_config(seg, rates, "head", heads)
    cpu = torch.device("cpu")
    plans = [build_document_compact_plan(pattern, 5, FLEX_LAYOUT, 16, causal, cpu)]
    if heads == "all":
        plans.append(build_document_natural_plan(pattern, 5, FLEX_LAYOUT, 16, causal, cpu))
    for plan in plans:
        bm = plan.block_mask
        ref = create_block_mask(bm.mask_mod, FLEX_LAYOUT.batch, bm.kv_num_blocks.shape[1], *bm.seq_lengths,
                                device="cpu", BLOCK_SIZE=16)
        assert torch.equal(bm.to_dense(), ref.to_dense())
        assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_documents_lse_merge_equals_reference(causal: bool) -> None:
    # heads="all" merges by lse on CUDA; eager flex returns the lse on CPU.
    from torch.nn.attention.flex_attention import flex_attention

    attn = _flex("all", [32, 64, 100], [2, 4, 1])
    attn._kernel, attn._lse_merge = flex_attention, True
    assert _flex_error(attn, FLEX_LAYOUT, causal) <= 1e-4


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_flex_documents_compiled_equals_reference() -> None:
    """Compiled flex skips full blocks without evaluating the mask: the tables must be right."""
    for heads, seg, rates in (("grouped", [16, 32, 64], [1, 2, 4]), ("all", [24, 50], [1, 3])):
        assert _flex_error(_flex(heads, seg, rates), FLEX_LAYOUT, causal=True) <= 1e-4


@pytest.mark.filterwarnings("ignore")
def test_flex_builds_one_plan_per_layout() -> None:
    attn = _flex("grouped", [16, 32], [1, 2])
    attn.use_path("eager")
    q = torch.randn(2, 150, 5, 16)
    with torch.no_grad():
        for _ in range(3):
            attn(q, q, q, causal=True, docs=FLEX_LAYOUT)
    assert attn.cache.stats()["misses"] == 1


def test_a_shared_cache_builds_a_layout_plan_once_for_all_layers() -> None:
    from dilexp.cache import build_cache

    cache = build_cache("cpu")  # the process-wide instance every layer gets
    layers = [build("sdpa", num_heads=2, head_dim=4, cache=cache) for _ in range(3)]
    layout = DocumentLayout(29, ((0, 3, 17), (0, 28)))  # a layout no other test uses
    q = torch.randn(2, 29, 2, 4)
    before = cache.stats()["misses"]
    for attn in layers:
        attn(q, q, q, causal=True, docs=layout)
    assert cache.stats()["misses"] - before == 1
