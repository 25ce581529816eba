"""The ratio tables of the tiered_cache, ring_cache/claims and pattern_cache claim studies.

    python experiments/tiered_cache/pairs.py outputs/tiered_cache/vs_none [more run or sweep folders]

For every bench.csv below the given folders, one markdown row per (N, non-main candidate):
main median, the other's median, main/other with the 95% bootstrap interval of
``dilexp.compare.bootstrap_ratio`` (the interval ``dilexp.compare --baseline`` prints), and
"paired": the median over the interleaved rounds of (main time / other time) in the same
round, with a 95% percentile bootstrap interval over rounds. The bench keeps each candidate's
times in round order (``times_ms``), and the two calls of a round run back to back, so the
paired ratio cancels most of the drift in machine load.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from dilexp.compare import bootstrap_ratio


def paired_ratio(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Median of the per-round ratios a[i] / b[i], and its 95% bootstrap interval over rounds."""
    r = np.asarray(a, dtype=float) / np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, r.size, size=(n_boot, r.size))], axis=1)
    return float(np.median(r)), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def rows_of(csv_path: Path) -> list[str]:
    rows = [r for r in csv.DictReader(csv_path.open()) if r.get("target") != "reference"]
    out = []
    for n in dict.fromkeys(r["seq_len"] for r in rows):
        case = [r for r in rows if r["seq_len"] == n and r.get("times_ms")]
        mains = [r for r in case if r["role"] == "main"]
        if not mains:
            continue
        main = mains[0]
        t_main = json.loads(main["times_ms"])
        for other in case:
            if other is main:
                continue
            t_other = json.loads(other["times_ms"])
            ci = bootstrap_ratio(t_main, t_other)
            lo, hi = ci if ci else (float("nan"), float("nan"))
            ratio = float(main["median_ms"]) / float(other["median_ms"])
            clear = "n.c.d." if lo <= 1 <= hi else ("main faster" if hi < 1 else "main slower")
            nan = float("nan")
            pm, plo, phi = paired_ratio(t_main, t_other) if len(t_main) == len(t_other) > 1 else (nan, nan, nan)
            out.append(f"| {csv_path.parent} | {n} | {main['variant']}/{main['cache_strategy']} "
                       f"| {float(main['median_ms']):.2f} | {other['variant']}/{other['cache_strategy']} "
                       f"| {float(other['median_ms']):.2f} | {ratio:.3f} [{lo:.3f}, {hi:.3f}] | {clear} "
                       f"| {pm:.3f} [{plo:.3f}, {phi:.3f}] "
                       f"| {main.get('cache_entries')} / {other.get('cache_entries')} |")
    return out


def main() -> None:
    print("| run | N | main | main ms | other | other ms | main/other [95% CI] | verdict | paired | entries |")
    print("|---|---:|---|---:|---|---:|---|---|---:|---|")
    for folder in sys.argv[1:]:
        for path in sorted(Path(folder).rglob("bench.csv")):
            for line in rows_of(path):
                print(line)


if __name__ == "__main__":
    main()
