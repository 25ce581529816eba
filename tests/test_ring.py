"""``ring_v2`` / ``ring_v3``: what is specific to ring attention, in one process.

The block maths, the layout/skip logic, the sharding helpers, caches, pregeneration and the
ring's own settings. Equality with the float64 reference (every chunk count, placement,
path and dtype, single- and multi-process) is in tests/conformance/; the ring's transfers
across processes in test_ring_distributed.py.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from dilexp import distributed as D
from dilexp.attention import build
from dilexp.attention.ring import RingV2Attention, RingV3Attention, configure_ring, ring_stats
from dilexp.cache import build_cache
from dilexp.cache.lru import LRUCache
from dilexp.cache.simple import LocalCache
from dilexp.cache.tiered import TwoTierCache
from dilexp.errors import ConfigError
from dilexp.patterns.dilated import DilatedPattern
from dilexp.patterns.ring_layout import make_layout, ranges_meet
from dilexp.patterns.ring_ops import build_block_pattern

H, DH = 6, 8

# name -> (segment_lengths, dilation_rates, heads, offsets): each covers an edge of the pattern.
PATTERNS = {
    "grouped": ([4, 8, 16], [1, 2, 4], "grouped", "head"),
    "all-heads": ([5, 12], [2, 3], "all", "head"),
    "w>=N-group-offsets": ([3, 7, 100], [1, 2, 3], "grouped", "group"),
    "rate>length": ([2, 5, 3], [4, 2, 1], "grouped", "head"),  # some offsets select nothing
}


def make(variant: str = "ring_v2", pattern: str = "grouped", **kw) -> RingV2Attention:
    seg, rates, heads, offsets = PATTERNS[pattern]
    kw.setdefault("cache", build_cache("local"))
    return build(variant, num_heads=H, head_dim=DH, segment_lengths=seg, dilation_rates=rates,
                 heads=heads, offsets=offsets, **kw)


def test_portable_masks_come_from_the_cache() -> None:
    cache = LocalCache()
    attn = make(chunks=2, cache=cache)
    attn.use_fused = False
    q = torch.randn(1, 40, H, DH, requires_grad=True)
    attn(q, q, q, causal=True).sum().backward()
    built = cache.stats()["misses"]
    assert any(key[0] == "ring_causal_mask" for key in cache.keys()), cache.keys()
    attn(q, q, q, causal=True).sum().backward()
    assert cache.stats()["misses"] == built


def test_no_gathers_and_kv_untouched() -> None:
    """Single-process, every op reads strided views of q, k, v: no index/gather/cat kernels run."""
    attn = make(chunks=4)
    q, k, v = (torch.randn(1, 64, H, DH, requires_grad=True) for _ in range(3))
    with torch.profiler.profile() as prof:
        out = attn(q, k, v, causal=True)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    names = {e.key for e in prof.key_averages()}
    banned = {"aten::index_select", "aten::index", "aten::gather", "aten::cat", "aten::stack", "aten::index_put_"}
    assert not names & banned, names & banned


# -- skip logic and stats --------------------------------------------------------------


def test_stats_count_skipped_pairs_and_send_nothing() -> None:
    attn = make(chunks=4)  # segments <= 16 over chunks of 16: off-diagonal pairs are empty
    q = torch.randn(1, 64, H, DH)
    attn(q, q, q, causal=False)
    s = attn.ring_stats()
    assert s["steps"] == 16 and s["skipped_steps"] == 12 and s["bytes_sent"] == 0 and s["calls"] == 1
    attn.reset_ring_stats()
    attn(q, q, q, causal=True)
    assert attn.ring_stats()["skipped_steps"] == 12
    assert ring_stats(torch.nn.Sequential(attn, make()))["steps"] == 16


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_plan_first_writers_cover_each_span_once(chunks: int, causal: bool) -> None:
    """Exactly one op copies into each (heads, rows) span, and it comes first in ring order;
    heads left with unwritten rows (rate > 1) are the ones zeroed."""
    attn = make(pattern="grouped", chunks=chunks)
    n = 37
    plan = attn.ring_plan(attn.layout(n, causal), causal, "cpu")
    seen: dict = {}
    for op in plan.steps[0]:
        key = (op.head_range, op.q)
        assert op.q_first == (key not in seen), op
        seen.setdefault(key, []).append(op)
    for ops in seen.values():
        assert all(op.q_only == (len(ops) == 1) for op in ops)
    covered = {h: sum(op.q.size for op in plan.steps[0] if op.q_first and op.head_range == h)
               for h in {op.head_range for op in plan.steps[0]}}
    zeroed = {h for h, c in covered.items() if c < n}
    assert set(plan.q_zero) == zeroed and set(plan.k_zero) == zeroed
    # Rate 1 (heads 0-1) selects every position; rates 2 and 4 leave rows unselected.
    assert zeroed == set(covered) - {(0, 2, 1)}, zeroed
    # "all": heads take several branches, so every op accumulates into zeroed buffers.
    attn = make(pattern="all-heads", chunks=chunks)
    plan = attn.ring_plan(attn.layout(n, causal), causal, "cpu")
    assert plan.q_zero is None and not any(op.q_first or op.k_first for op in plan.ops())


def test_layout_causal_skips_the_future() -> None:
    pattern = DilatedPattern.from_config([100], [1])
    br = tuple(pattern.branches(2))
    lay = make_layout(br, 40, 1, 0, 4, "contiguous", True)
    assert sorted(lay.pairs[0]) == [(a, b) for a in range(4) for b in range(4) if b <= a]
    # Several ranks: a causal ring with contiguous shards sends every shard forward only.
    lay = make_layout(br, 40, 4, 2, 1, "contiguous", True)
    assert lay.maxdist == (3, 2, 1, 0)
    assert [j for j, p in enumerate(lay.pairs) if p] == [0, 1, 2]
    lay = make_layout(br, 40, 4, 2, 1, "zigzag", True)
    assert all(len(p) == 1 for p in lay.pairs)  # zigzag: every rank needs every shard


def test_segments_inside_shards_send_nothing() -> None:
    pattern = DilatedPattern.from_config([4, 8], [1, 2])
    br = tuple(pattern.branches(4))
    for causal, rank in itertools.product([False, True], range(4)):
        lay = make_layout(br, 32, 4, rank, 2, "contiguous", causal)
        assert lay.maxdist == (0, 0, 0, 0)
        assert [bool(p) for p in lay.pairs] == [j == rank for j in range(4)]


def test_analytic_emptiness_agrees_with_built_patterns() -> None:
    rng = random.Random(0)
    for _ in range(300):
        w, r = rng.randint(1, 12), rng.randint(1, 5)
        pattern = DilatedPattern.from_config([w], [r], heads="all")
        for br in pattern.branches(r):
            a0, b0 = rng.randint(0, 40), rng.randint(0, 40)
            qa, ka = (a0, a0 + rng.randint(1, 20)), (b0, b0 + rng.randint(1, 20))
            for causal in (False, True):
                built = build_block_pattern([br], ((*qa, 0),), ((*ka, 0),), causal)
                assert ranges_meet(qa, ka, br, causal) == bool(built), (w, r, br.offset, qa, ka, causal)


def test_smaller_blocks_with_more_chunks() -> None:
    """The memory bound: the largest score block of one call shrinks with ``chunks``."""

    def largest(chunks: int) -> int:
        attn = make(pattern="w>=N-group-offsets", chunks=chunks)
        lay = attn.layout(96, causal=False)
        return max(op.score_elems for a, b in lay.pairs[0]
                   for op in attn.block_pattern(lay.q_units[a], lay.kv_units[0][b], False))

    assert largest(4) * 4 <= largest(1)


# -- caches, pregeneration ---------------------------------------------------------------


def test_default_caches_and_pregeneration() -> None:
    seg, rates, heads, offsets = PATTERNS["grouped"]
    v2 = RingV2Attention(H, DH, seg, rates, chunks=2)
    assert isinstance(v2.cache, LRUCache)
    v3 = RingV3Attention(H, DH, seg, rates, chunks=2, cache=TwoTierCache(promote_after=1))
    assert isinstance(RingV3Attention(H, DH, seg, rates).cache, TwoTierCache)
    q = torch.randn(1, 40, H, DH)
    v3(q, q, q, causal=True)
    s = v3.cache.stats()
    # The plan of this call's mask was built before the call (and only it), so it saw only hits.
    assert s["misses"] == 0 and s["hits"] > 0 and s["pregenerated"] == s["entries"] == 1, s
    v3(q, q, q, causal=False)  # the other mask: pre-generated on its first call too
    s = v3.cache.stats()
    assert s["misses"] == 0 and s["pregenerated"] == s["entries"] == 2, s


def test_prepare_then_all_hits() -> None:
    cache = LocalCache()
    attn = make(chunks=3, cache=cache)
    attn.prepare(30, "cpu")
    built = cache.stats()["misses"]
    q = torch.randn(1, 30, H, DH, requires_grad=True)
    attn(q, q, q, causal=True).sum().backward()
    assert cache.stats()["misses"] == built and cache.stats()["hits"] > 0


def test_set_shard_single_process() -> None:
    attn = make(seq_len=24)
    assert configure_ring(torch.nn.Sequential(attn), 24) == 1
    q = torch.randn(1, 24, H, DH)
    assert attn(q, q, q).shape == q.shape


# -- sharding helpers ----------------------------------------------------------------------


def test_shard_bounds_remainder_and_zigzag() -> None:
    assert D.shard_bounds(10, 4) == [((0, 3),), ((3, 6),), ((6, 8),), ((8, 10),)]
    assert D.shard_bounds(10, 2, "zigzag") == [((0, 3), (8, 10)), ((3, 6), (6, 8))]
    for n, p, placement in itertools.product([7, 16, 37], [1, 2, 3, 4], D.PLACEMENTS):
        bounds = D.shard_bounds(n, p, placement)
        positions = sorted(x for rg in bounds for a, b in rg for x in range(a, b))
        assert positions == list(range(n))
        lengths = [D.ranges_len(rg) for rg in bounds]
        assert max(lengths) - min(lengths) <= (1 if placement == "contiguous" else 2)
        x = torch.arange(n).view(1, n, 1)
        for r in range(p):
            assert torch.equal(D.shard_sequence(x, r, p, placement).flatten(), D.shard_positions(n, r, p, placement))
    assert D.unshard_sequence(torch.ones(1, 5), 5).shape == (1, 5)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"chunks": 0}, "attention.chunks"),
        ({"chunks": True}, "attention.chunks"),
        ({"placement": "spiral"}, "attention.placement"),
        ({"group": "everyone"}, "attention.group"),
        ({"timeout_s": 0}, "attention.timeout_s"),
        ({"seq_len": 0}, "data.seq_len"),
    ],
)
def test_bad_config_names_the_field(kw: dict, field: str) -> None:
    args = {"num_heads": H, "head_dim": DH, "segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4]}
    args.update(kw)
    with pytest.raises(ConfigError) as e:
        build("ring_v2", **args)
    assert e.value.field == field


def test_sequence_shorter_than_world() -> None:
    with pytest.raises(ConfigError, match="data.seq_len"):
        D.check_shardable(3, 4)
    with pytest.raises(ConfigError, match="data.seq_len"):
        D.shard_sequence(torch.zeros(1, 3), 0, 4)

