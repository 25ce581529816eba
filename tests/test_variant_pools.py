"""Honest pools: a variant given a pool takes its buffers from it, or refuses it at config time."""

from __future__ import annotations

import pytest
import torch

from dilexp.attention import available, build, capabilities
from dilexp.attention.reference import dense_reference
from dilexp.errors import ConfigError
from dilexp.memory import BucketedPool

H, D = 4, 8
SETTINGS = {
    "dilated": {"segment_lengths": [8, 16], "dilation_rates": [1, 2]},
    "improved": {"segment_lengths": [8, 16], "dilation_rates": [1, 2]},
    "ring_v2": {"segment_lengths": [8, 16], "dilation_rates": [1, 2], "chunks": 2},
    "ring_v3": {"segment_lengths": [8, 16], "dilation_rates": [1, 2], "chunks": 2},
    # N = 40 is not a multiple of the block size: the padded copies are scratch too.
    "block_sparse": {"block_size": 16, "local_blocks": 1, "dilation": 2, "global_blocks": 1},
    "flex": {"segment_lengths": [8, 16], "dilation_rates": [1, 2], "block_size": 16},
}
USERS = [n for n in available() if capabilities(n).pool]
REFUSERS = [n for n in available() if not capabilities(n).pool]


def test_every_variant_is_sorted_one_way_or_the_other() -> None:
    assert sorted(USERS) == sorted(SETTINGS)  # a new variant must say whether it uses a pool
    assert set(REFUSERS) == {"sdpa"}


@pytest.mark.parametrize("name", USERS)
def test_pool_counters_move_and_results_stay_exact(name: str) -> None:
    pool = BucketedPool(reclaim=True)  # outputs leave the call: reclaim takes them back
    attn = build(name, num_heads=H, head_dim=D, pool=pool, **SETTINGS[name])
    if "eager" in capabilities(name).paths:
        attn.use_path("eager")  # flex: the same plan and gathers without a compile
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, H, D, generator=gen) for _ in range(3))
    ref = dense_reference(q, k, v, attn.dense_multiplicity(40), causal=True)
    with torch.no_grad():
        first = attn(q, k, v, causal=True)
        before = pool.stats()
        del first
        second = attn(q, k, v, causal=True)
    after = pool.stats()
    assert before["requests"] > 0, before
    # The second call is served from what the first gave back (or dropped, with reclaim).
    assert after["requests"] > before["requests"] and after["reuses"] + after["reclaims"] > 0, after
    assert torch.allclose(second, ref.to(second.dtype), atol=1e-4)
    if not capabilities(name).backward_on("cpu"):
        return
    # With autograd too: the buffers still come from the pool, gradients flow.
    qg = q.clone().requires_grad_(True)
    out = attn(qg, k, v, causal=True)
    out.sum().backward()
    assert pool.stats()["requests"] > after["requests"] and qg.grad is not None


@pytest.mark.parametrize("name", REFUSERS)
def test_a_pool_the_variant_cannot_use_is_refused(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(name, num_heads=H, head_dim=D, pool=BucketedPool())
    assert err.value.field == "memory.kind"
    assert f"attention={name}" in str(err.value) and "\n" not in str(err.value)
    build(name, num_heads=H, head_dim=D)  # memory=none is fine
