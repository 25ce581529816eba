"""Plans come from patterns/, one cache lookup per call per layer, under keys patterns/ spells."""

from __future__ import annotations

import pytest
import torch

from dilexp.attention import available, build, capabilities
from dilexp.cache import LocalCache
from dilexp.patterns.dilated import DilatedPattern
from dilexp.patterns.gather import build_gather_plan, gather_entry

H, D, N = 4, 8, 48
DILATED = {"segment_lengths": [8, 16], "dilation_rates": [1, 2]}
SETTINGS = {"block_sparse": {"block_size": 16}, "ring_v2": {**DILATED, "chunks": 2},
            "ring_v3": {**DILATED, "chunks": 2}}


@pytest.mark.parametrize("name", [n for n in available() if n != "sdpa"])
def test_a_call_makes_one_cache_lookup(name: str) -> None:
    cache = LocalCache()
    attn = build(name, num_heads=H, head_dim=D, cache=cache, **SETTINGS.get(name, DILATED))
    if "eager" in capabilities(name).paths:
        attn.use_path("eager")  # flex: the same plan without a compile
    q = torch.randn(1, N, H, D)
    with torch.no_grad():
        attn(q, q, q, causal=True)
        before = cache.stats()
        attn(q, q, q, causal=True)
    after = cache.stats()
    assert after["hits"] + after["misses"] - before["hits"] - before["misses"] == 1


def test_the_bench_gets_the_key_and_build_dilated_looks_up() -> None:
    pattern = DilatedPattern((8, 16), (1, 2))
    key, build_fn = gather_entry(pattern, N, H, True)
    cache = LocalCache()
    attn = build("dilated", num_heads=H, head_dim=D, cache=cache, **DILATED)
    q = torch.randn(1, N, H, D)
    attn(q, q, q, causal=True)
    assert cache.keys() == [key]
    built, ref = build_fn(), build_gather_plan(pattern, N, H, True)
    assert all(torch.equal(a, b) for x, y in zip(built, ref, strict=True) for a, b in zip(x, y, strict=True))
