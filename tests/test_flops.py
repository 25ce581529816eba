"""FLOP counts by DESIGN section 8's two conventions, against counts made here by hand
and from the dense reference's mask (the pattern's multiplicity), never from the formulas."""

from __future__ import annotations

import pytest
import torch

from dilexp.attention import build
from dilexp.bench.flops import attention_flops, attention_pairs, matmul_flops, model_flops, pair_flops
from dilexp.tasks.components import build_model
from dilexp.telemetry.callbacks import Telemetry


def mask_pairs(attn, n: int, causal: bool) -> int:
    """Allowed pairs from the (H, N, N) multiplicity the dense reference takes, causal mask applied here."""
    mult = attn.dense_multiplicity(n)
    if causal:
        mult = mult * torch.ones(n, n, dtype=mult.dtype).tril()
    return int(mult.sum())


def test_a_tiny_pattern_counted_by_hand() -> None:
    # One head, segments of 4 with rate 2, offset 0: positions {0, 2} and {4, 6} of N=8.
    # Each segment: 2 x 2 pairs, or 3 under the causal mask (0-0, 2-0, 2-2).
    attn = build("dilated", num_heads=1, head_dim=8, segment_lengths=[4], dilation_rates=[2])
    assert mask_pairs(attn, 8, causal=False) == 8 and mask_pairs(attn, 8, causal=True) == 6
    assert attention_pairs(attn, 8, causal=False) == 8 and attention_pairs(attn, 8, causal=True) == 6
    # Kernel count: 4 * D per pair forward, 14 * D forward + backward; batch 3.
    assert attention_flops(attn, 8, batch=3, causal=True, mode="fwd") == 4 * 8 * 6 * 3
    assert attention_flops(attn, 8, batch=3, causal=True, mode="fwd_bwd") == 14 * 8 * 6 * 3
    assert attention_flops(attn, 8, batch=3, causal=False, mode="fwd_bwd") == 14 * 8 * 8 * 3


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_count_of_a_multi_branch_pattern_matches_the_mask(causal: bool) -> None:
    attn = build("dilated", num_heads=5, head_dim=16, segment_lengths=[16, 32, 64], dilation_rates=[1, 2, 4])
    for n in (64, 100):
        pairs = mask_pairs(attn, n, causal)
        assert attention_flops(attn, n, batch=2, causal=causal, mode="fwd") == 4 * 16 * pairs * 2
        assert attention_flops(attn, n, batch=2, causal=causal, mode="fwd_bwd") == 14 * 16 * pairs * 2


def test_model_count_of_a_training_step(compose_cfg) -> None:
    cfg = compose_cfg(["attention=dilated", "model.n_layer=2", "model.n_head=4", "model.d_model=32",
                       "attention.segment_lengths=[8,16]", "attention.dilation_rates=[1,2]"])
    model, _ = build_model(cfg, vocab_size=50)
    n, batch, d = 24, 2, 8
    attns = model.attention_modules()
    assert len(attns) == 2 and attns[0].head_dim == d
    pairs = sum(mask_pairs(a, n, causal=True) for a in attns)
    params = model.num_params(non_embedding=True)
    # Model count: 6 * params per token, 12 * D per pair and layer (2 and 4 forward only).
    assert model_flops(model, n, batch, "fwd_bwd") == pytest.approx(6 * params * n * batch + 12 * d * pairs * batch)
    assert model_flops(model, n, batch, "fwd") == pytest.approx(2 * params * n * batch + 4 * d * pairs * batch)
    from dilexp.tasks.train import train_flops_per_step

    assert train_flops_per_step(model, n, batch) == model_flops(model, n, batch, "fwd_bwd")


def test_the_two_conventions_differ_only_in_the_backward() -> None:
    assert pair_flops(64, "fwd", "kernel") == pair_flops(64, "fwd", "model") == 4 * 64
    assert pair_flops(64, "fwd_bwd", "kernel") == 14 * 64 and pair_flops(64, "fwd_bwd", "model") == 12 * 64
    assert matmul_flops(10) == 2000.0
    with pytest.raises(ValueError, match="mode"):
        pair_flops(64, "bwd", "kernel")


def test_the_metrics_line_names_the_model_count() -> None:
    m = {"perf/tokens_per_s": 100.0, "perf/step_ms": 10.0, "perf/tflops": 0.5, "perf/mfu": 0.25}
    line = Telemetry.format_line(3, 2.0, m)
    assert "TFLOP/s (model) 0.500" in line and "MFU (model) 25.0%" in line
