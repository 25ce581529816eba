"""The optimization_matrix tables, from the run records of the two designs.

    python experiments/optimization_matrix/tables.py \
        outputs/optimization_matrix/attn_B outputs/optimization_matrix/attn_A

Each PATH is a sweep (or run) folder of `experiment=optimization_matrix`. A job of design B
(main cache=none memory=bucketed, twins cache=cpu and memory=none) holds three cells of the
2x2 matrix, timed interleaved; a job of design A (main cache=cpu memory=bucketed, twins
cache=none and memory=none) holds three cells too, one of them the fourth cell. Every ratio
printed is between two rows of ONE job (interleaved), with the percentile bootstrap interval of
`dilexp.compare.bootstrap_ratio` (the interval `python -m dilexp.compare ... --baseline role=...`
prints), with the same seed and 2000 resamples, so the figures match that command's.

Columns: t(cache, pool) medians in ms; "speedup" is slower / faster = 1 / (time ratio), so > 1
means the optimization helps; the interval is of the time ratio optimized / unoptimized
(< 1 everywhere in it: clearly faster; > 1: clearly slower; containing 1: no clear difference).
``--cross`` adds the one ratio the two designs cannot pair in one job (cache=cpu vs cache=none,
both without a pool: design A's cpu/none row against design B's none/none row). It is NOT
interleaved (two processes, minutes apart) and is printed only to show how unreliable that is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dilexp.compare import bootstrap_ratio


def cells(paths: list[str]) -> dict[tuple[str, str, int], dict[str, dict]]:
    """(target, variant, N) -> {design+cell: row}, cell = 'cache/memory' of that candidate."""
    out: dict[tuple[str, str, int], dict[str, dict]] = {}
    for p in paths:
        for f in sorted(Path(p).rglob("summary.json")):
            rec = json.loads(f.read_text())
            rows = [r for r in rec.get("bench", []) if r.get("status") == "ok"]
            if not rows:
                continue
            main = next((r for r in rows if r["role"] == "main"), None)
            design = "B" if main and main["cache_strategy"] == "none" else "A"
            for r in rows:
                key = (r["target"], r["variant"], int(r["seq_len"]))
                cell = f"{r['cache_strategy']}/{r['memory_kind']}"
                out.setdefault(key, {})[f"{design}:{cell}"] = r
    return out


def ratio(a: dict | None, b: dict | None) -> str:
    """'speedup [lo, hi] verdict' of b over a (time ratio a/b and its interval)."""
    if a is None or b is None:
        return "-"
    r = a["median_ms"] / b["median_ms"]
    ci = bootstrap_ratio(a["times_ms"], b["times_ms"])
    if ci is None:
        return f"{1 / r:.2f}x"
    verdict = "n.c.d." if ci[0] <= 1 <= ci[1] else ("**faster**" if ci[1] < 1 else "**slower**")
    return f"{1 / r:.2f}x ({r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]) {verdict}"


def main(paths: list[str]) -> None:
    data = cells(paths)
    on, off, cache_only, pool_only = "cpu/bucketed", "none/none", "cpu/none", "none/bucketed"
    cross = "--cross" in sys.argv
    print("### Time: medians (ms) and interleaved ratios\n")
    print("| target | variant | N | repeats | off ms | both ms | both vs off (B) | pool alone (B) "
          "| cache, with pool (B) | cache, with pool (A) | pool, with cache (A) |"
          + (" cache alone (A vs B, NOT interleaved) |" if cross else ""))
    print("|---|---|---:|---:|---:|---:|---|---|---|---|---|" + ("---|" if cross else ""))
    for (target, variant, n), c in sorted(data.items()):
        g = c.get
        b_off, b_on = g("B:" + off), g("B:" + on)
        reps = (b_on or g("A:" + on) or {}).get("repeats", "-")
        t_off = f"{b_off['median_ms']:.1f}" if b_off else "-"
        t_on = f"{b_on['median_ms']:.1f}" if b_on else "-"
        line = (f"| {target} | {variant} | {n} | {reps} | {t_off} | {t_on} "
                f"| {ratio(b_on, b_off)} | {ratio(g('B:' + pool_only), b_off)} "
                f"| {ratio(b_on, g('B:' + pool_only))} | {ratio(g('A:' + on), g('A:' + pool_only))} "
                f"| {ratio(g('A:' + on), g('A:' + cache_only))} |")
        if cross:
            line += f" {ratio(g('A:' + cache_only), b_off)} |"
        print(line)
    print("\n### Memory (MiB): peak allocation during the call / peak held (allocation + idle pool and cache bytes)\n")
    print("| target | variant | N | off | cache only | pool only | both | both/off alloc | both/off held "
          "| pool reuse | reclaimed MiB/call |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (target, variant, n), c in sorted(data.items()):
        def mem(*keys: str, c: dict = c) -> tuple[str, dict | None]:
            for k in keys:
                if k in c:
                    return f"{c[k]['peak_alloc_mb']:.1f} / {c[k]['peak_held_mb']:.1f}", c[k]
            return "-", None
        s_off, r_off = mem("B:" + off, "A:" + off)
        s_co, _ = mem("A:" + cache_only)
        s_po, _ = mem("B:" + pool_only, "A:" + pool_only)
        s_on, r_on = mem("B:" + on, "A:" + on)
        if r_on and r_off:
            ra = f"{r_on['peak_alloc_mb'] / r_off['peak_alloc_mb']:.3f}"
            rh = f"{r_on['peak_held_mb'] / r_off['peak_held_mb']:.3f}"
            calls = r_on["warmup"] + r_on["repeats"] + 1
            reuse = f"{r_on.get('pool_reuse_rate', 0):.3f}"
            recl = f"{r_on.get('pool_reclaimed_bytes', 0) / 2**20 / calls:.1f}"
        else:
            ra = rh = reuse = recl = "-"
        print(f"| {target} | {variant} | {n} | {s_off} | {s_co} | {s_po} | {s_on} | {ra} | {rh} | {reuse} | {recl} |")


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if a != "--cross"] or ["outputs/optimization_matrix"])
