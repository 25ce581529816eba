"""The machine's practical dense throughput, measured in the same run: a plain fp32 matmul.

Its row (target ``reference``) gives the attention rows' ``frac_of_matmul``.
"""

from __future__ import annotations

from typing import Any

import torch

from dilexp.bench.flops import matmul_flops
from dilexp.bench.settings import BenchSettings
from dilexp.bench.timing import Candidate, free_memory, run_interleaved, spread


def matmul_reference(s: BenchSettings, dev: torch.device) -> dict[str, Any]:
    """A plain fp32 (size x size) matmul: the machine's practical dense throughput, in the same run."""
    row: dict[str, Any] = {"target": "reference", "variant": "matmul", "role": "reference", "seq_len": s.matmul_size,
                           "dtype": "float32", "mode": "fwd", "device": str(dev), "warmup": max(1, s.warmup),
                           "repeats": s.repeats, "flops": matmul_flops(s.matmul_size)}
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(s.matmul_size, s.matmul_size, generator=gen).to(dev)
        b = torch.randn(s.matmul_size, s.matmul_size, generator=gen).to(dev)
        c = Candidate("matmul", lambda: torch.mm(a, b))
        run_interleaved([c], max(1, s.warmup), s.repeats, dev)
    except Exception as e:  # noqa: BLE001
        c = Candidate("matmul", lambda: None)
        c.fail(e)
        del e
    row["status"] = c.status
    if c.error:
        row["error"] = c.error
    if c.alive:
        row.update(spread([t * 1e3 for t in c.times_s], "ms"))
        row["tflops"] = row["flops"] / c.median_s / 1e12
        row["gflops"] = row["flops"] / c.median_s / 1e9
    free_memory(dev)
    return row

