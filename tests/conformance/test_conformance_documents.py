"""Packed documents in every registered variant (issue 18): ``attn(q, k, v, docs=layout)``
equals the document-masked dense reference, values and gradients, on random layouts.

The oracle is built from the *settings* (``space.oracle_multiplicity``) for each document's
own length, never from the module under test: block-diagonal, each document's block the
pattern of a sequence of that length (DESIGN: the document is its own sequence).
Layouts are drawn to include documents of one token, documents shorter than the smallest
segment or block, and documents longer than the largest, with rows that share a layout and
rows that do not.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from space import TOL, Case, Draw, HypothesisDraw, draw_case, inputs, oracle_multiplicity

from dilexp.attention import available, build, capabilities
from dilexp.attention.reference import dense_reference, document_multiplicity
from dilexp.patterns.documents import DocumentLayout

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = available()


class SettingsOracle:
    """``dense_multiplicity(n)`` from a case's settings alone (what document_multiplicity reads)."""

    def __init__(self, case: Case) -> None:
        self.case = case

    def dense_multiplicity(self, n: int) -> torch.Tensor:
        c = self.case
        return oracle_multiplicity(capabilities(c.variant).pattern, c.settings, n, c.num_heads)


def draw_row(d: Draw, n: int, longest: int) -> tuple[int, ...]:
    """Start offsets of one row: lengths drawn from tiny (1-3), medium and long (> ``longest``)."""
    starts, pos = [0], 0
    while True:
        kind = d.choice(["tiny", "tiny", "medium", "long"])
        length = {"tiny": d.int(1, 3), "medium": d.int(1, max(1, longest)),
                  "long": d.int(longest + 1, 2 * longest + 2)}[kind]
        pos += length
        if pos >= n:
            return tuple(starts)
        starts.append(pos)


def longest_unit(case: Case) -> int:
    """The largest segment (dilated) or block (block_sparse): "long" documents exceed it."""
    s = case.settings
    if "segment_lengths" in s:
        return max(s["segment_lengths"])
    return int(s.get("block_size", 4))


def draw_layout(case: Case, d: Draw) -> DocumentLayout:
    shared = d.choice([True, False])
    first = draw_row(d, case.n, longest_unit(case))
    rows = [first if shared else draw_row(d, case.n, longest_unit(case)) for _ in range(case.b)]
    rows[0] = first
    return DocumentLayout(case.n, tuple(rows))


def document_errors(case: Case, layout: DocumentLayout, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", attn: Any = None, oracle_layout: DocumentLayout | None = None
                    ) -> tuple[float, float | None]:
    """(max abs output error, max abs q/k/v gradient error or None without a backward here).
    ``oracle_layout``: the reference's layout when it is not the one the module gets."""
    attn = (attn if attn is not None else case.build()).to(device)
    mult = document_multiplicity(SettingsOracle(case), oracle_layout or layout)
    leaves, (q, k, v), grad_out = inputs(case, dtype, device)
    backward = attn.capabilities.backward_on(device)
    with torch.set_grad_enabled(backward):
        out = attn(q, k, v, causal=case.causal, docs=layout)
    assert out.shape == q.shape and out.dtype == dtype
    leaves64 = tuple(x.detach().double().requires_grad_() for x in leaves)
    q64, k64, v64 = leaves64[0].unbind(2) if case.layout == "qkv" else leaves64
    ref = dense_reference(q64, k64, v64, mult.to(device), case.causal)
    out_err = (out.double() - ref).abs().max().item()
    if not backward:
        return out_err, None
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
    return out_err, max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads, strict=True))


def assert_documents_conform(case: Case, layout: DocumentLayout, dtype: torch.dtype = torch.float32,
                             **kw: Any) -> None:
    out_err, grad_err = document_errors(case, layout, dtype, **kw)
    worst = max(out_err, grad_err or 0.0)
    assert worst <= TOL[dtype], (out_err, grad_err, case, layout)


def test_every_variant_takes_documents() -> None:
    for name in VARIANTS:
        assert capabilities(name).documents, f"{name} declares no document support"


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_documents_equal_the_document_masked_reference(name: str, data: st.DataObject) -> None:
    d = HypothesisDraw(data.draw)
    case = draw_case(name, d, max_n=40, min_n=2)
    assert_documents_conform(case, draw_layout(case, d))


# (settings, N, row lengths): documents below the smallest segment / block, above the largest.
EDGES: dict[str, list[tuple[dict[str, Any], int, list[list[int]]]]] = {
    "dilated": [
        ({"segment_lengths": [4, 8], "dilation_rates": [1, 2]}, 40, [[1, 3, 2, 20, 14], [12, 1, 27]]),
        ({"segment_lengths": [3, 6, 12], "dilation_rates": [1, 2, 4]}, 37, [[5, 7, 25], [5, 7, 25]]),
    ],
    "block_sparse": [
        ({"block_size": 8, "local_blocks": 1, "dilation": 2, "global_blocks": 1}, 70, [[3, 40, 1, 26], [70]]),
    ],
    "full": [({}, 30, [[1, 2, 27], [29, 1]])],
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_edge_layouts_equal_the_reference(name: str, causal: bool) -> None:
    caps = capabilities(name)
    for i, (s, n, lengths) in enumerate(EDGES[caps.pattern]):
        for path in [p for p in caps.paths if p not in caps.slow_paths]:
            own = {k: v[i % len(v)] for k, v in caps.settings.items()}
            heads = {"heads": caps.head_layouts[i % len(caps.head_layouts)]} if caps.head_layouts else {}
            case = Case(name, {**s, **own, **heads}, 4, 8, n, len(lengths), causal, path, seed=i)
            rows = tuple(tuple(sum(r[:j]) for j in range(len(r))) for r in lengths)
            assert_documents_conform(case, DocumentLayout(n, rows))


@pytest.mark.parametrize("name", VARIANTS)
def test_a_layout_changes_the_result_and_a_wrong_one_is_caught(name: str) -> None:
    """The comparison can fail: the variant without the layout, or with another layout,
    is far from the document-masked reference."""
    caps = capabilities(name)
    s, n, lengths = EDGES[caps.pattern][0]
    case = Case(name, {**s, **{k: v[0] for k, v in caps.settings.items()}}, 2, 8, n, 1, True,
                [p for p in caps.paths if p not in caps.slow_paths][0])
    starts = tuple(sum(lengths[0][:j]) for j in range(len(lengths[0])))
    layout = DocumentLayout(n, (starts,))
    attn = case.build()
    good = document_errors(case, layout, attn=attn)[0]
    assert good <= TOL[torch.float32]

    class Without:  # the module as called with no layout at all
        capabilities = attn.capabilities

        def to(self, device: str) -> Any:
            return self

        def __call__(self, q, k, v, causal, docs):  # type: ignore[no-untyped-def]
            return attn(q, k, v, causal=causal)

    assert document_errors(case, layout, attn=Without())[0] > 1e-2
    other = DocumentLayout(n, ((0, starts[1] + 1, *starts[2:]),))  # one boundary moved by one token
    assert document_errors(case, other, attn=attn)[0] <= TOL[torch.float32]  # against its own reference
    assert document_errors(case, other, attn=attn, oracle_layout=layout)[0] > 1e-2


@pytest.mark.parametrize("name", VARIANTS)
def test_one_document_per_row_is_no_layout(name: str) -> None:
    caps = capabilities(name)
    s, n, _ = EDGES[caps.pattern][0]
    attn = build(name, num_heads=2, head_dim=8, **s, **{k: v[0] for k, v in caps.settings.items()})
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 2, 8, generator=gen) for _ in range(3))
    with torch.no_grad():
        plain = attn(q, k, v, causal=True)
        same = attn(q, k, v, causal=True, docs=DocumentLayout.single(2, n))
    assert torch.equal(plain, same)
