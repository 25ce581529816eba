"""Minor page faults and time per fwd+bwd call, memory=bucketed (reclaim) vs memory=none.

    flock /tmp/dilexp_bench.lock python experiments/optimization_matrix/faults.py improved 4096 16384 65536

One thread; the two builds (same variant, cache=none, the settings of conf/attention/<variant>)
alternate call by call on the same q, k, v, as the bench does. Prints, per N and pool, the
median minor page faults (getrusage ru_minflt) and the median time of the timed calls.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf

from dilexp.attention import build
from dilexp.memory import build_pool


def main(variant: str, lens: list[int], calls: int = 9) -> None:
    torch.set_num_threads(1)
    acfg = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(f"conf/attention/{variant}.yaml")).items()
            if k not in ("name", "defaults")}
    pools = {"bucketed": build_pool("bucketed", reclaim=True, exact=True), "none": build_pool("none")}
    mods = {k: build(variant, num_heads=8, head_dim=64, pool=p, **acfg) for k, p in pools.items()}
    print("| variant | N | pool | minor faults / call | MiB faulted / call | median ms |")
    print("|---|---:|---|---:|---:|---:|")
    for n in lens:
        q, k, v = (torch.randn(1, n, 8, 64, requires_grad=True) for _ in range(3))
        g = torch.randn(1, n, 8, 64)
        faults: dict[str, list[int]] = {p: [] for p in mods}
        times: dict[str, list[float]] = {p: [] for p in mods}
        for i in range(calls + 2):
            for name, m in mods.items():
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                torch.autograd.grad(m(q, k, v, causal=True), (q, k, v), g)
                t1 = time.perf_counter()
                f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                if i >= 2:
                    faults[name].append(f1 - f0)
                    times[name].append((t1 - t0) * 1e3)
        for name in mods:
            f = statistics.median(faults[name])
            ms = statistics.median(times[name])
            print(f"| {variant} | {n} | {name} | {f:.0f} | {f * 4096 / 2**20:.1f} | {ms:.1f} |")
        for p in pools.values():
            p.clear()


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2:]])
