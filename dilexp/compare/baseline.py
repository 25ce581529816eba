"""`--baseline KEY=VALUE`: each row's ratio to its baseline row, with a bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence

from dilexp.compare.rows import Row, _aliases


def apply_baseline(rows: list[Row], key: str, value: str, metric: str, n_boot: int = 2000,
                   level: float = 0.95) -> None:
    """Ratio of ``metric`` to the baseline row with the same other settings (where both have them)."""
    ignore = {key} | _aliases(rows, key)
    bases = [r for r in rows if r.identity.get(key) == value]
    for row in rows:
        if row.identity.get(key) == value:
            row.note = "baseline"
            row.ratio = 1.0 if metric in row.values else None
            continue
        if key not in row.identity:
            continue
        best, best_shared, tied = None, -1, False
        for b in bases:
            shared = (row.identity.keys() & b.identity.keys()) - ignore
            if any(row.identity[k] != b.identity[k] for k in shared):
                continue
            if len(shared) > best_shared:
                best, best_shared, tied = b, len(shared), False
            elif len(shared) == best_shared:
                tied = True
        if best is None or tied:
            row.note = "no baseline" if best is None else "ambiguous baseline"
            continue
        a, b = row.values.get(metric), best.values.get(metric)
        if a is None or not b:
            row.note = "no value" if row.status == "completed" else ""
            continue
        row.ratio = a / b
        row.ci = bootstrap_ratio(row.samples.get(metric, []), best.samples.get(metric, []), n_boot, level)
        if row.ci is not None and row.ci[0] <= 1.0 <= row.ci[1]:
            row.note = "no clear difference"
        elif row.ci is not None:
            row.note = "lower" if row.ci[1] < 1.0 else "higher"


def bootstrap_ratio(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of median(a) / median(b), resampling each side on its own."""
    import numpy as np

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.size < 2 or xb.size < 2:
        return None
    rng = np.random.default_rng(seed)  # fixed: the same records give the same table
    ma = np.median(xa[rng.integers(0, xa.size, size=(n_boot, xa.size))], axis=1)
    mb = np.median(xb[rng.integers(0, xb.size, size=(n_boot, xb.size))], axis=1)
    ok = mb != 0
    if not ok.any():
        return None
    ratios = ma[ok] / mb[ok]
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(ratios, [tail, 1.0 - tail])
    return float(lo), float(hi)
