"""Does cutting a causal call into non-causal rectangles plus small triangles beat torch's fused causal kernel?

    python experiments/attention_speed/staircase.py

One thread, one run: a 4096^2 fp32 matmul, the fused causal kernel at L=2048 (every
subsequence `improved` computes for the issue 3 shape), the same attention cut into
rectangles and triangles of side ``c``, and the non-causal call (the kernel's best case).

The cut: the causal square of side L is the causal squares of its two halves plus the
full rectangle "second half's queries x first half's keys"; recursing down to side ``c``
leaves log2(L / c) levels of rectangles (one batched call per level) and one batched call
for the L / c small triangles. Forward merges the pieces by log-sum-exp; backward calls the
kernel's backward on each piece with the *merged* output and log-sum-exp (the identity ring
attention uses) and adds the pieces' gradients. FLOPs are counted as DESIGN section 8 counts
kernel throughput: 4 * D per allowed pair forward, 14 * D forward + backward.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from kernel_roof import FLASH as flash  # this script's folder is on sys.path when run as a script
from kernel_roof import FLASH_BWD as flash_bwd
from kernel_roof import median_s

D = 64
L = 2048
BATCH = 8
SIDES = (1024, 512, 256, 128, 64)
ROUNDS = 9
SCALE = D**-0.5


def _rect(x: torch.Tensor, side: int, half: int) -> torch.Tensor:
    """(B, 1, L, D) -> (B * L / (2 side), 1, side, D) view: half 1 = queries, half 0 = keys."""
    b, _, n, d = x.shape
    return x.view(b, n // (2 * side), 2, side, d)[:, :, half].flatten(0, 1).unsqueeze(1)


def _tri(x: torch.Tensor, side: int) -> torch.Tensor:
    b, _, n, d = x.shape
    return x.view(b * n // side, 1, side, *x.shape[3:])


def pieces(side: int) -> list[tuple[int, str]]:
    """(side, kind) of every call: the rectangle levels, then the triangles."""
    levels, s = [], L // 2
    while s >= side:
        levels.append((s, "rect"))
        s //= 2
    return [*levels, (side, "tri")]


def staircase_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, side: int) -> torch.Tensor:
    b = q.shape[0]
    out = torch.zeros(b, 1, L, D)
    lse = torch.full((b, 1, L), float("-inf"))
    plan = pieces(side)
    for s, kind in plan:
        if kind == "rect":
            qs, ks, vs = _rect(q, s, 1), _rect(k, s, 0), _rect(v, s, 0)
            o_view = out.view(b, L // (2 * s), 2, s, D)[:, :, 1]
            l_view = lse.view(b, L // (2 * s), 2, s)[:, :, 1]
        else:
            qs, ks, vs = _tri(q, s), _tri(k, s), _tri(v, s)
            o_view, l_view = out.view(b, L // s, s, D), lse.view(b, L // s, s)
        o_p, l_p = flash(qs, ks, vs, 0.0, kind == "tri", scale=SCALE)
        o_p, l_p = o_p.view(o_view.shape), l_p.view(l_view.shape)
        new = torch.logaddexp(l_view, l_p)
        o_view.mul_(torch.exp(l_view - new).unsqueeze(-1)).add_(o_p * torch.exp(l_p - new).unsqueeze(-1))
        l_view.copy_(new)
    dq, dk, dv = (torch.zeros_like(q) for _ in range(3))
    for s, kind in plan:
        if kind == "rect":
            qs, ks, vs, gs, os_ = _rect(q, s, 1), _rect(k, s, 0), _rect(v, s, 0), _rect(g, s, 1), _rect(out, s, 1)
            ls = lse.view(b, L // (2 * s), 2, s)[:, :, 1].reshape(-1, 1, s)
            targets = (_rect(dq, s, 1), _rect(dk, s, 0), _rect(dv, s, 0))
        else:
            qs, ks, vs, gs, os_ = (_tri(x, s) for x in (q, k, v, g, out))
            ls = lse.view(-1, 1, s)
            targets = (_tri(dq, s), _tri(dk, s), _tri(dv, s))
        parts = flash_bwd(gs, qs, ks, vs, os_, ls, 0.0, kind == "tri", scale=SCALE)
        for t, p in zip(targets, parts, strict=True):
            t.add_(p)
    return out, (dq, dk, dv)


def fused_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, causal: bool = True):
    out, lse = flash(q, k, v, 0.0, causal, scale=SCALE)
    return out, flash_bwd(g, q, k, v, out, lse, 0.0, causal, scale=SCALE)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(BATCH, 1, L, D) for _ in range(4))
    ref_out, ref_grads = fused_step(q, k, v, g)
    for side in SIDES:  # the cut is exact before it is timed
        out, grads = staircase_step(q, k, v, g, side)
        err = max((a - b).abs().max().item() for a, b in zip((out, *grads), (ref_out, *ref_grads), strict=True))
        assert err < 1e-4, f"staircase side {side}: max error {err}"
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    causal_flops = 14 * D * BATCH * L * (L + 1) / 2
    cases: dict[str, tuple[Callable[[], object], float]] = {
        "fused causal": (lambda: fused_step(q, k, v, g), causal_flops),
        **{f"staircase c={s}": (lambda s=s: staircase_step(q, k, v, g, s), causal_flops) for s in SIDES},
        "fused non-causal": (lambda: fused_step(q, k, v, g, causal=False), 14 * D * BATCH * L * L),
    }
    secs: dict[str, list[float]] = {name: [] for name in cases}
    matmul = []
    for _ in range(ROUNDS):  # each round times every case once, so ratios within a round share the load
        matmul.append(2 * 4096**3 / median_s(lambda: a @ b, 1))
        for name, (fn, _) in cases.items():
            secs[name].append(median_s(fn, 1))
    mm = statistics.median(matmul)
    print(f"L={L}, D={D}, batch {BATCH}, 1 thread, {ROUNDS} rounds; matmul {mm / 1e9:.1f} GFLOP/s")
    print(f"{'case':18s} {'useful GFLOP/s':>14s} {'% of matmul':>11s}  fused causal time / this (median, min-max)")
    for name, (_, flops) in cases.items():
        gf = flops / statistics.median(secs[name]) / 1e9
        ratio = [f / t for f, t in zip(secs["fused causal"], secs[name], strict=True)]
        print(
            f"{name:18s} {gf:14.1f} {100 * gf * 1e9 / mm:11.1f}  "
            f"{statistics.median(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f})"
        )


if __name__ == "__main__":
    main()
