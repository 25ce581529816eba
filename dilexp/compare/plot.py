"""`--plot`: a metric against a setting, one line per configuration, or bars for a
categorical setting (attention=sdpa,dilated,...)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dilexp.compare.rows import Row, _aliases, _natural_key, _sort_key, varying_keys
from dilexp.compare.runs import CompareError, _num
from dilexp.compare.table import REFERENCE_ROLES, Table
from dilexp.metrics import label as metric_label


def _match_key(name: str, keys: Iterable[str]) -> str | None:
    keys = list(keys)
    if name in keys:
        return name
    hits = [k for k in keys if k.split(".")[-1] == name or k.split("/")[-1] == name]
    return hits[0] if len(hits) == 1 else None


@dataclass
class PlotInfo:
    path: Path
    x: str
    y: str
    lines: list[str]  # the legend's labels, in its order
    xscale: str
    yscale: str
    kind: str = "lines"  # or "bars" for a categorical x
    references: list[str] = field(default_factory=list)


def _pick(tables: list[Table], x: str, y: str) -> tuple[Table, str, str]:
    for t in tables:
        xk = _match_key(x, {k for r in t.rows for k in r.identity})
        yk = _match_key(y, {k for r in t.rows for k in r.values} | set(t.metrics))
        if xk and yk:
            return t, xk, yk
    raise CompareError(f"--plot: no table has both x={x!r} (a setting or bench field) and y={y!r} (a metric; "
                       f"add it with --metrics if it is not a column)")


def _label_keys(rows: list[Row], xk: str) -> list[str]:
    """The settings that vary among the plotted rows, less x and what moves with it."""
    ignore = {xk} | _aliases(rows, xk)
    return [k for k in varying_keys(rows) if k not in ignore]


def _label(row: Row, keys: list[str]) -> str:
    """``k=v`` of the varying settings, less one whose value an earlier one already says
    (a bench row's variant that is its job's attention choice)."""
    parts: list[str] = []
    said: set[str] = set()
    for k in keys:
        value = row.identity.get(k)
        if value is not None and value not in said:
            parts.append(f"{k}={value}")
            said.add(value)
    return ", ".join(parts)


def _why_empty(t: Table, xk: str, yk: str) -> str:
    have_y = [r for r in t.rows if yk in r.values]
    if not have_y:
        statuses = sorted({r.status for r in t.rows})
        return f"--plot: no row has a value of {yk} (rows: {', '.join(statuses)}); nothing to draw"
    return f"--plot: no row with a value of {yk} has the setting {xk}; pick --x among {', '.join(t.keys) or '-'}"


def _log_if_wide(ax: Any, axis: Any, values: list[float]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0]
    if len(positive) == len(values) and positive and max(positive) / min(positive) >= 10:
        (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _spread(pts: list[Row], yk: str) -> list[list[float]] | None:
    """Error bars: the quartiles of each point's repeats (none where there is one figure)."""
    if not any(r.samples.get(yk) for r in pts):
        return None
    ys = [r.values[yk] for r in pts]
    lo = [y - _quantile(r.samples.get(yk), 0.25, y) for r, y in zip(pts, ys, strict=True)]
    hi = [_quantile(r.samples.get(yk), 0.75, y) - y for r, y in zip(pts, ys, strict=True)]
    return [lo, hi]


def plot(tables: list[Table], out: Path, x: str, y: str) -> PlotInfo:
    """``y`` against ``x``: one line per configuration for a numeric x, grouped bars for a
    categorical one. An axis is logarithmic where its data spans a decade or more; reference
    rows (the matmul) are horizontal levels; labels name only the settings that vary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, xk, yk = _pick(tables, x, y)
    # The reference rows come in a table of their own (make_tables): a level on this plot.
    refs = [r for u in tables if u.kind == t.kind for r in u.rows
            if r.identity.get("role") in REFERENCE_ROLES and yk in r.values]
    rows = [r for r in t.rows if r not in refs and yk in r.values and xk in r.identity]
    if not rows:
        raise CompareError(_why_empty(t, xk, yk))
    numeric = all(_num(r.identity[xk]) is not None for r in rows)
    label_keys = _label_keys(rows, xk)
    lines: dict[str, list[Row]] = {}
    for r in rows:
        lines.setdefault(_label(r, label_keys) or metric_label(yk), []).append(r)

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ys_all = [r.values[yk] for r in rows]
    if numeric:
        xs_all = []
        for label, pts in sorted(lines.items(), key=lambda kv: _natural_key(kv[0])):
            pts.sort(key=lambda r: _num(r.identity[xk]) or 0.0)
            xs = [float(r.identity[xk]) for r in pts]
            ax.errorbar(xs, [r.values[yk] for r in pts], yerr=_spread(pts, yk), marker="o", capsize=3, label=label)
            xs_all += xs
        _log_if_wide(ax, ax.xaxis, xs_all)
        distinct = sorted(set(xs_all))
        if len(distinct) <= 12:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            # Few settings (sequence lengths, head counts): tick exactly those.
            ax.set_xticks(distinct)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        cats = sorted({r.identity[xk] for r in rows}, key=_sort_key)
        width = 0.8 / len(lines)
        for i, (label, pts) in enumerate(sorted(lines.items(), key=lambda kv: _natural_key(kv[0]))):
            pts.sort(key=lambda r: cats.index(r.identity[xk]))
            pos = [cats.index(r.identity[xk]) - 0.4 + width * (i + 0.5) for r in pts]
            ax.bar(pos, [r.values[yk] for r in pts], width=width, yerr=_spread(pts, yk), capsize=3, label=label)
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=30 if max(len(c) for c in cats) > 8 else 0, ha="right" if
                           max(len(c) for c in cats) > 8 else "center")
    # Every bench job measures the same reference: one level, at the median over the jobs.
    levels: dict[str, list[float]] = {}
    for r in refs:
        size = r.identity.get("seq_len")  # the matmul's side
        name = f"{r.identity.get('variant', 'reference')}" + (f" {size}x{size}" if size else "")
        levels.setdefault(name, []).append(r.values[yk])
    for name, values in sorted(levels.items()):
        level = statistics.median(values)
        runs = f", median of {len(values)} runs" if len(values) > 1 else ""
        ax.axhline(level, color="grey", linestyle="--", linewidth=1, label=f"{name} (reference{runs})")
        ys_all.append(level)
    references = sorted(levels)
    _log_if_wide(ax, ax.yaxis, ys_all)
    ax.set_xlabel(xk)
    spread = any(r.samples.get(yk) for r in rows)
    ax.set_ylabel(metric_label(yk) + ("  (error bars: quartiles of repeats)" if spread else ""))
    ax.set_title(f"{metric_label(yk)} vs {xk}", fontsize=11)
    ax.grid(True, which="both", alpha=0.3, axis="both" if numeric else "y")
    if len(lines) > 1 or refs:
        # Outside the axes: a legend never hides a point.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    info = PlotInfo(out, xk, yk, sorted(lines, key=_natural_key), ax.get_xscale(), ax.get_yscale(),
                    "lines" if numeric else "bars", references)
    plt.close(fig)
    return info


def _quantile(samples: list[float] | None, q: float, default: float) -> float:
    if not samples or len(samples) < 2:
        return default
    import numpy as np

    return float(np.quantile(samples, q))
