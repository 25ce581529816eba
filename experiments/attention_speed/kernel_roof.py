"""Useful GFLOP/s of torch's fused CPU flash kernel against a 4096^2 fp32 matmul, one thread, one run.

    python experiments/attention_speed/kernel_roof.py

Forward + backward, counted as DESIGN section 8 does: 4 * D flops per allowed pair, x2.5.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

D = 64
CASES = [(2048, True, 8), (2048, False, 4), (16384, True, 1), (16384, False, 1)]  # (L, causal, batch)


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flash_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, causal: bool) -> None:
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    out, lse = flash(q, k, v, 0.0, causal, scale=D**-0.5)
    flash_bwd(g, q, k, v, out, lse, 0.0, causal, scale=D**-0.5)


def main() -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    matmul = 2 * 4096**3 / median_s(lambda: a @ b, 5) / 1e9
    print(f"matmul 4096 fp32: {matmul:.1f} GFLOP/s")
    for length, causal, batch in CASES:
        q, k, v, g = (torch.randn(batch, 1, length, D) for _ in range(4))
        pairs = batch * (length * (length + 1) // 2 if causal else length * length)
        secs = median_s(lambda q=q, k=k, v=v, g=g, c=causal: flash_step(q, k, v, g, c), 3)
        useful = 4 * D * 2.5 * pairs / secs / 1e9
        print(f"L={length:6d} causal={causal!s:5s}: {useful:5.1f} GFLOP/s useful = "
              f"{100 * useful / matmul:4.1f}% of matmul")


if __name__ == "__main__":
    main()
