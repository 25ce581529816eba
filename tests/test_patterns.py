"""The dilated pattern itself: dense masks against hand-written cases, head groups, validation."""

from __future__ import annotations

import pytest
import torch

from dilexp.errors import ConfigError
from dilexp.patterns.dilated import DilatedPattern, segment_positions


def _block(n: int, groups: list[list[int]]) -> torch.Tensor:
    """(n, n) int mask where every listed position set sees itself; written out, not derived."""
    m = torch.zeros(n, n, dtype=torch.int64)
    for g in groups:
        for a in g:
            for b in g:
                m[a, b] += 1
    return m


def test_grouped_head_offsets_hand_case() -> None:
    # H=2, pairs (4, 1) and (8, 2): head 0 = group 0 sees its 4-block; head 1 = group 1,
    # offset 1 mod 2 = 1, sees the odd positions of the one 8-segment.
    p = DilatedPattern.from_config([4, 8], [1, 2], offsets="head")
    mult = p.dense_multiplicity(8, 2)
    expected0 = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ]
    )
    expected1 = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 1, 0, 1, 0, 1],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 1, 0, 1, 0, 1],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 1, 0, 1, 0, 1],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 1, 0, 1, 0, 1],
        ]
    )
    assert torch.equal(mult[0], expected0)
    assert torch.equal(mult[1], expected1)


def test_group_offsets_and_ragged_last_segment() -> None:
    # H=4 in groups {0,1}, {2,3}; "group" offsets give group 1 o = 1 mod 2 = 1 for both heads.
    # N=7 with w=4: segments [0,4) and the shorter [4,7).
    p = DilatedPattern.from_config([2, 4], [1, 2], offsets="group")
    mult = p.dense_multiplicity(7, 4)
    g0 = _block(7, [[0, 1], [2, 3], [4, 5], [6]])
    g1 = _block(7, [[1, 3], [5]])
    for h, exp in enumerate([g0, g0, g1, g1]):
        assert torch.equal(mult[h], exp), h


def test_head_offsets_differ_within_a_group() -> None:
    # One pair (6, 3) on 3 heads: offsets 0, 1, 2 tile the segment.
    p = DilatedPattern.from_config([6], [3], offsets="head")
    mult = p.dense_multiplicity(6, 3)
    assert torch.equal(mult[0], _block(6, [[0, 3]]))
    assert torch.equal(mult[1], _block(6, [[1, 4]]))
    assert torch.equal(mult[2], _block(6, [[2, 5]]))


def test_all_layout_counts_multiplicity() -> None:
    # Every pair on every head, offset h mod r: head 0 gets (2,1,o=0) and (4,2,o=0),
    # head 1 gets (2,1,o=0) and (4,2,o=1). Keys both pairs select count twice.
    p = DilatedPattern.from_config([2, 4], [1, 2], heads="all")
    mult = p.dense_multiplicity(4, 2)
    expected0 = torch.tensor([[2, 1, 1, 0], [1, 1, 0, 0], [1, 0, 2, 1], [0, 0, 1, 1]])
    expected1 = torch.tensor([[1, 1, 0, 0], [1, 2, 0, 1], [0, 0, 1, 1], [0, 1, 1, 2]])
    assert torch.equal(mult[0], expected0)
    assert torch.equal(mult[1], expected1)


def test_segment_longer_than_sequence_is_one_segment() -> None:
    p = DilatedPattern.from_config([100], [2], offsets="head")
    mult = p.dense_multiplicity(5, 1)
    assert torch.equal(mult[0], _block(5, [[0, 2, 4]]))
    idx, valid = segment_positions(5, 100, 2, 1)
    assert idx[valid].tolist() == [1, 3]


def test_rate_above_segment_length_can_select_nothing() -> None:
    # w=2, r=4: offsets 2 and 3 lie outside every segment.
    p = DilatedPattern.from_config([2], [4], offsets="head")
    mult = p.dense_multiplicity(6, 4)
    assert torch.equal(mult[0], _block(6, [[0], [2], [4]]))
    assert torch.equal(mult[1], _block(6, [[1], [3], [5]]))
    assert mult[2].sum() == 0 and mult[3].sum() == 0


def test_segment_positions_pads_the_last_segment() -> None:
    idx, valid = segment_positions(10, 4, 2, 1)
    assert idx.shape == (3, 2)
    assert idx[valid].tolist() == [1, 3, 5, 7, 9]
    assert valid.tolist() == [[True, True], [True, True], [True, False]]


@pytest.mark.parametrize(
    ("heads", "m", "sizes"),
    [(6, 3, [2, 2, 2]), (5, 3, [2, 2, 1]), (7, 3, [3, 2, 2]), (3, 3, [1, 1, 1]), (4, 1, [4])],
)
def test_head_groups_split_evenly_first_groups_larger(heads: int, m: int, sizes: list[int]) -> None:
    p = DilatedPattern.from_config([8] * m, [1] * m)
    groups = p.head_groups(heads)
    assert [len(g) for g in groups] == sizes
    assert [h for g in groups for h in g] == list(range(heads))


def test_branches_batch_heads_sharing_an_offset() -> None:
    p = DilatedPattern.from_config([4, 8], [1, 2], offsets="head")
    br = p.branches(5)  # groups {0,1,2}, {3,4}
    assert [(b.segment_length, b.dilation_rate, b.offset, b.heads) for b in br] == [
        (4, 1, 0, (0, 1, 2)),
        (8, 2, 0, (4,)),
        (8, 2, 1, (3,)),
    ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"segment_lengths": [4, 8], "dilation_rates": [1]}, "attention.dilation_rates"),
        ({"segment_lengths": [4, 0], "dilation_rates": [1, 2]}, "attention.segment_lengths"),
        ({"segment_lengths": [4, 8], "dilation_rates": [1, 0]}, "attention.dilation_rates"),
        ({"segment_lengths": [], "dilation_rates": []}, "attention.segment_lengths"),
        ({"segment_lengths": [4], "dilation_rates": [1], "offsets": "row"}, "attention.offsets"),
        ({"segment_lengths": [4], "dilation_rates": [1], "heads": "some"}, "attention.heads"),
        ({"segment_lengths": ["a"], "dilation_rates": [1]}, "attention.segment_lengths"),
    ],
)
def test_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        DilatedPattern.from_config(**kwargs)
    assert e.value.field == field
    assert str(e.value).startswith(field)


def test_grouped_needs_a_head_per_pair() -> None:
    p = DilatedPattern.from_config([4, 8, 16], [1, 2, 4])
    with pytest.raises(ConfigError) as e:
        p.branches(2)
    assert e.value.field == "model.n_head"
    # "all" puts every pair on every head, so one head is enough.
    assert len(DilatedPattern.from_config([4, 8, 16], [1, 2, 4], heads="all").branches(1)) == 3


def test_sdpa_allowed_pairs_closed_form_matches_dense_mask() -> None:
    from dilexp.attention import build

    attn = build("sdpa", num_heads=3, head_dim=8)
    for n in (1, 5, 16):
        for causal in (False, True):
            mult = attn.dense_multiplicity(n)
            expected = int((torch.tril(mult) if causal else mult).sum())
            assert attn.allowed_pairs(n, causal) == expected
