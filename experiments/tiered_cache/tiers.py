"""Where the patterns end up: per (variant, cache) the cache's own stats after the bench's
usage pattern (pregenerate, then a few fwd+bwd calls at N = 1024, 2048, 4096, causal).

    python experiments/tiered_cache/tiers.py            # from the repo root, ~1 min on 1 thread

Prints one line per (variant, strategy): entries and bytes, split into hot / cold tier
for `gpu`, and the Python size of one cached ring plan (it holds no tensors, so the
caches count it as 0 bytes).
"""

from __future__ import annotations

import pickle

import torch

from dilexp.attention import build
from dilexp.cache import build_cache, pregenerate_patterns, reset_global_cache

SETTINGS = {"num_heads": 8, "head_dim": 64, "segment_lengths": [64, 128, 256], "dilation_rates": [1, 2, 4]}
CASES = [
    ("ring_v2", "none", {}), ("ring_v2", "cpu", {}), ("ring_v3", "gpu", {}),
    ("ring_v3", "gpu", {"pregenerate": False}),
    ("dilated", "none", {}), ("dilated", "cpu", {}), ("dilated", "gpu", {}),
    ("dilated", "gpu", {"pregenerate": False}),
    ("dilated", "gpu", {"pregenerate": False, "hot_max_bytes": 65536}),
]
KEYS = ("entries", "bytes", "hot_entries", "hot_bytes", "cold_entries", "cold_bytes", "hits", "misses",
        "pregenerated", "promotions", "demotions")


def main() -> None:
    torch.set_num_threads(1)
    for name, strategy, extra in CASES:
        reset_global_cache()
        cache = build_cache(strategy, **extra)
        attn = build(name, cache=cache, **SETTINGS)
        for n in (1024, 2048, 4096):
            pregenerate_patterns([attn], n, "cpu", causal=True)  # as the bench does with bench.causal=true
            gen = torch.Generator().manual_seed(n)
            q, k, v = (torch.randn(1, n, 8, 64, generator=gen, requires_grad=True) for _ in range(3))
            for _ in range(4):
                attn(q, k, v, causal=True).sum().backward()
        st = cache.stats()
        line = " ".join(f"{key}={st[key]:.0f}" for key in KEYS)
        tag = ",".join(f"{k}={v}" for k, v in extra.items())
        print(f"{name:8s} {strategy:4s} {tag:38s} {line}")
    # One ring plan's size as a Python object (not counted in `bytes`: no tensors in it).
    reset_global_cache()
    cache = build_cache("cpu")
    attn = build("ring_v2", cache=cache, **SETTINGS)
    for n in (1024, 2048, 4096):
        lay = attn.layout(n, True)
        plan = attn.ring_plan(lay, True, "cpu")
        print(f"ring plan N={n}: {len(plan.ops())} ops, {len(pickle.dumps(plan)) / 1024:.1f} KiB pickled")


if __name__ == "__main__":
    main()
