"""Useful GFLOP/s of torch's fused CPU flash kernel against a 4096^2 fp32 matmul, one thread, one run.

    python experiments/attention_speed/kernel_roof.py

Useful FLOPs are counted as DESIGN section 8 counts kernel throughput (the FlashAttention
benchmark count): 4 * D per allowed pair forward, 10 * D backward (it recomputes the
scores, then dP, dV, dQ and dK), 14 * D in all: how busy the kernel keeps the multipliers,
against the matmul. A kernel at the matmul's rate shows 100%.

The last lines time `improved` on the issue 3 shape (N=16384, H=8, causal, segments
[2048,4096,8192], rates [1,2,4], offsets=group) against the fused kernel on the same work
laid out contiguously (its 40 causal subsequences of 2048 as one batch), interleaved, so
the ratio is what `improved` costs beyond the kernel calls themselves.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

D = 64
# (L, causal, batch)
CASES = [(1024, False, 16), (2048, True, 8), (2048, False, 4), (16384, True, 1), (16384, False, 1)]


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def main() -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    # The matmul is timed before every case and its median used throughout: on a shared
    # VM one early reading can be 10% off and would move every percentage with it.
    matmul_runs: list[float] = []

    def time_matmul() -> None:
        matmul_runs.append(2 * 4096**3 / median_s(lambda: a @ b, 3) / 1e9)

    rows = []
    for length, causal, batch in CASES:
        time_matmul()
        q, k, v, g = (torch.randn(batch, 1, length, D) for _ in range(4))
        pairs = batch * (length * (length + 1) // 2 if causal else length * length)
        out, lse = FLASH(q, k, v, 0.0, causal, scale=D**-0.5)
        fwd = median_s(lambda q=q, k=k, v=v, c=causal: FLASH(q, k, v, 0.0, c, scale=D**-0.5), 3)
        bwd = median_s(
            lambda q=q, k=k, v=v, g=g, o=out, s=lse, c=causal: FLASH_BWD(g, q, k, v, o, s, 0.0, c, scale=D**-0.5), 3
        )
        rows.append((length, causal, pairs, fwd, bwd))
    time_matmul()
    improved = improved_overhead()
    time_matmul()
    matmul = statistics.median(matmul_runs)
    print(
        f"matmul 4096 fp32: {matmul:.1f} GFLOP/s (median of {len(matmul_runs)}: "
        f"{min(matmul_runs):.1f}-{max(matmul_runs):.1f})"
    )
    print(
        f"{'L':>6s} {'causal':6s} | % of matmul, useful FLOPs: {'fwd':>5s} {'bwd':>5s} {'total':>5s}"
    )
    for length, causal, pairs, fwd, bwd in rows:

        def pct(flops_per_pair: float, secs: float, pairs: int = pairs) -> float:
            return 100 * flops_per_pair * D * pairs / secs / 1e9 / matmul

        print(
            f"{length:6d} {causal!s:6s} | {'':26s}{pct(4, fwd):5.1f} {pct(10, bwd):5.1f} "
            f"{pct(14, fwd + bwd):5.1f}"
        )
    pairs, subseqs, times = improved
    print(f"issue 3 shape: {subseqs} causal subsequences of 2048, {pairs} pairs")
    for name, secs in times.items():
        useful = 14 * D * pairs / statistics.median(secs) / 1e9
        print(f"  {name:8s} {statistics.median(secs):6.3f} s  {100 * useful / matmul:5.1f}% of matmul (useful)")
    ratios = [a / b for a, b in zip(times["improved"], times["kernel"], strict=True)]
    print(f"  improved / kernel: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


def improved_overhead(rounds: int = 5) -> tuple[int, int, dict[str, list[float]]]:
    from dilexp.attention import build

    n, h = 16384, 8
    attn = build(
        "improved",
        num_heads=h,
        head_dim=D,
        segment_lengths=[2048, 4096, 8192],
        dilation_rates=[1, 2, 4],
        offsets="group",
    )
    pairs = attn.allowed_pairs(n, causal=True)
    subseqs = pairs // (2048 * 2049 // 2)
    assert subseqs * (2048 * 2049 // 2) == pairs, "the issue 3 shape is whole causal subsequences of 2048"
    q, k, v = (torch.randn(1, n, h, D, requires_grad=True) for _ in range(3))
    g = torch.randn(1, n, h, D)
    bq, bk, bv, bg = (torch.randn(subseqs, 1, 2048, D) for _ in range(4))

    def improved_step() -> None:
        attn(q, k, v, causal=True).backward(g)
        q.grad = k.grad = v.grad = None

    def kernel_step() -> None:
        out, lse = FLASH(bq, bk, bv, 0.0, True, scale=D**-0.5)
        FLASH_BWD(bg, bq, bk, bv, out, lse, 0.0, True, scale=D**-0.5)

    times: dict[str, list[float]] = {"improved": [], "kernel": []}
    for _ in range(rounds):
        times["improved"].append(median_s(improved_step, 1))
        times["kernel"].append(median_s(kernel_step, 1))
    return pairs, subseqs, times


if __name__ == "__main__":
    main()
