"""`python -m dilexp.compare SWEEP --frontier`: the speed x quality trade-off of train runs.

    python -m dilexp.compare SWEEP --frontier                          # tok/s vs val/acc -> frontier.png
    python -m dilexp.compare SWEEP OTHER_SWEEP --frontier --y val/loss --minimize y --plot loss.png

One point per configuration (compare's rows: runs that differ only in the seed are repeats), at the
median of its completed seeds, with the seeds' min..max as error bars on both axes. The Pareto front
(the configurations no other one beats on both axes at once) is drawn as a step line and printed as
a table. The Pareto computation is :func:`pareto_front`, a pure function of the points.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dilexp.compare import CompareError, Row, Run, _fmt, _match_key, _num, build_rows, varying_keys
from dilexp.metrics import label

DEFAULT_X = "perf/tokens_per_s_median"
DEFAULT_Y = "val/acc"
SPREAD = "min..max of seeds"


# -- the front -------------------------------------------------------------------------------


def dominates(a: tuple[float, float], b: tuple[float, float], maximize: tuple[bool, bool] = (True, True)) -> bool:
    """``a`` is at least as good as ``b`` on both axes and better on one."""
    better = [(p > q) if up else (p < q) for p, q, up in zip(a, b, maximize, strict=True)]
    worse = [(p < q) if up else (p > q) for p, q, up in zip(a, b, maximize, strict=True)]
    return any(better) and not any(worse)


def pareto_front(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices of the points no other point dominates, in increasing x (ties: input order).

    ``maximize`` says per axis whether higher is better. Equal points do not dominate each other,
    so duplicates on the front are all kept; a point that only ties another on one axis and is
    worse on the other is dominated. Raises ValueError on a non-finite coordinate, which would
    make every comparison false and silently put the point on the front.
    """
    for i, p in enumerate(points):
        if len(p) != 2 or not all(math.isfinite(v) for v in p):
            raise ValueError(f"point {i}: {p!r} is not two finite numbers")
    # Quadratic, but over configurations (tens, not millions): plain and obviously right.
    front = [i for i, p in enumerate(points) if not any(dominates(q, p, maximize) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], i))


# -- points from runs ------------------------------------------------------------------------


@dataclass
class Point:
    """One configuration: medians over its seeds, the seeds' range, whether it is on the front."""

    identity: dict[str, str]
    x: float
    y: float
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    n: int
    runs: list[str]
    label: str = ""
    on_front: bool = False


@dataclass
class Frontier:
    x: str
    y: str
    maximize: tuple[bool, bool]
    points: list[Point]
    label_keys: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def front(self) -> list[Point]:
        return sorted((p for p in self.points if p.on_front), key=lambda p: (p.x, p.y))


def _seeds(row: Row, key: str) -> list[float]:
    # A train row keeps its per-run figures as samples when it has repeats, else just the value.
    return list(row.samples.get(key) or [row.values[key]])


def _short_keys(keys: list[str]) -> dict[str, str]:
    """``data.seq_len`` -> ``seq_len`` where that stays unambiguous: labels must fit a plot."""
    tails = [k.split(".")[-1] for k in keys]
    return {k: t if tails.count(t) == 1 else k for k, t in zip(keys, tails, strict=True)}


def _label(identity: dict[str, str], keys: list[str], short: dict[str, str]) -> str:
    # A key a run lacks is an override it did not have: it ran with the config's default.
    return ", ".join(f"{short[k]}={identity.get(k, 'default')}" for k in keys) or "the one configuration"


def _axis_key(name: str, available: set[str]) -> str:
    # An exact key, or a unique last part of one (`acc` -> `val/acc`), as for --plot.
    return _match_key(name, sorted(available)) or name


def build_frontier(runs: list[Run], x: str = DEFAULT_X, y: str = DEFAULT_Y, maximize: tuple[bool, bool] = (True, True),
                   where: Sequence[tuple[str, str]] = ()) -> Frontier:
    """The configurations of the completed train runs, with ``x`` and ``y`` and the front marked.

    Raises CompareError when no completed train run has ``x`` or ``y``; a configuration without one
    of them is left out and named in ``skipped``.
    """
    done = [r for r in runs if r.task == "train" and not r.bench and r.status == "completed"]
    if not done:
        raise CompareError("--frontier: no completed train run (task=train, status completed) among "
                           f"the {len(runs)} runs found")
    available = {k for r in done for k, v in r.metrics.items() if _num(v) is not None}
    xk, yk = _axis_key(x, available), _axis_key(y, available)
    missing = [(flag, k) for flag, k in (("--x", xk), ("--y", yk)) if k not in available]
    if missing:
        names = " or ".join(k for _, k in missing)
        near = sorted(k for k in available if any(k.split("/")[0] == m.split("/")[0] for _, m in missing))
        hint = f"; similar keys they have: {', '.join(near[:8])}" if near else ""
        raise CompareError(f"no completed train run has {names}; pick another with "
                           f"{' / '.join(f for f, _ in missing)}{hint}")

    rows = [r for r in build_rows(done, "train", [xk, yk]) if all(r.identity.get(k) == v for k, v in where)]
    if not rows:
        raise CompareError("--frontier: no configuration left after --where")
    all_keys = varying_keys(rows)
    short = _short_keys(all_keys)
    skipped, kept = [], []
    for row in rows:
        lacking = [k for k in (xk, yk) if k not in row.values]
        if lacking:
            skipped.append(f"{_label(row.identity, all_keys, short)}: no {' or '.join(lacking)} "
                           f"in its {row.n} completed run{'s' * (row.n > 1)}")
        else:
            kept.append(row)
    # Labels tell the plotted configurations apart: settings a skipped one alone varies are noise.
    label_keys = varying_keys(kept)
    short = _short_keys(label_keys)
    points = []
    for row in kept:
        xs, ys = _seeds(row, xk), _seeds(row, yk)
        points.append(Point(row.identity, row.values[xk], row.values[yk], (min(xs), max(xs)), (min(ys), max(ys)),
                            min(len(xs), len(ys)), row.runs, _label(row.identity, label_keys, short)))
    for i in pareto_front([(p.x, p.y) for p in points], maximize):
        points[i].on_front = True
    return Frontier(xk, yk, maximize, points, label_keys, skipped)


# -- output ----------------------------------------------------------------------------------


def _title(key: str) -> str:
    return label(key)


def _direction(up: bool) -> str:
    return "higher is better" if up else "lower is better"


def render_front(fr: Frontier, fmt: str = "table", width: int | None = None) -> str:
    """The front as a table: configuration, x median, y median, seeds. ``table`` fits ``width``
    (80 unless told) columns; ``md`` and ``csv`` for files (csv with the seeds' ranges too)."""
    front = fr.front
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["configuration", *fr.label_keys, fr.x, f"{fr.x}_min", f"{fr.x}_max", fr.y, f"{fr.y}_min",
                    f"{fr.y}_max", "n"])
        for p in front:
            w.writerow([p.label, *(p.identity.get(k, "") for k in fr.label_keys), p.x, *p.x_range, p.y,
                        *p.y_range, p.n])
        return buf.getvalue()
    caption = (f"{len(front)} of {len(fr.points)} configurations on the front; medians over seeds "
               f"(n); {_title(fr.x)}: {_direction(fr.maximize[0])}, {_title(fr.y)}: {_direction(fr.maximize[1])}")
    heads = ["configuration", f"{_title(fr.x)} (median)", f"{_title(fr.y)} (median)", "n"]
    if fmt == "md":
        lines = [f"### Pareto front: {fr.y} vs {fr.x}\n", f"{caption}\n", "| " + " | ".join(heads) + " |",
                 "|---|---:|---:|---:|"]
        lines += [f"| {p.label.replace('|', chr(92) + '|')} | {_fmt(p.x)} | {_fmt(p.y)} | {p.n} |" for p in front]
        return "\n".join(lines) + "\n"
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, width=width or 80, highlight=False, color_system=None)
    table = Table(title=f"Pareto front: {fr.y} vs {fr.x}", title_justify="left", caption=caption,
                  caption_justify="left")
    table.add_column(heads[0], overflow="fold", ratio=1)
    for h in heads[1:]:
        table.add_column(h, justify="right", no_wrap=True)
    for p in front:
        table.add_row(escape(p.label), _fmt(p.x), _fmt(p.y), str(p.n))
    console.print(table)
    return buf.getvalue()


def plot_frontier(fr: Frontier, out: Path) -> Path:
    """One marker per configuration at its medians, min..max bars, the front as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    front_color, other_color = "tab:red", "0.45"
    fig, ax = plt.subplots(figsize=(10, 5.8), dpi=120)
    for on_front in (False, True):
        pts = [p for p in fr.points if p.on_front == on_front]
        if not pts:
            continue
        color = front_color if on_front else other_color
        ax.errorbar([p.x for p in pts], [p.y for p in pts],
                    xerr=[[p.x - p.x_range[0] for p in pts], [p.x_range[1] - p.x for p in pts]],
                    yerr=[[p.y - p.y_range[0] for p in pts], [p.y_range[1] - p.y for p in pts]],
                    fmt="D" if on_front else "o", ms=8 if on_front else 6, color=color,
                    mfc=color if on_front else "white", mec=color, ecolor=color, elinewidth=1, capsize=3,
                    alpha=1.0 if on_front else 0.8, zorder=3 if on_front else 2)
    front = fr.front
    # The edge of the region the front dominates: between two front points the reachable value is
    # the next point's when higher x is better (steps-pre), the previous one's when lower is.
    ax.plot([p.x for p in front], [p.y for p in front], color=front_color, lw=1.5, alpha=0.8, zorder=1,
            drawstyle="steps-pre" if fr.maximize[0] else "steps-post")

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    # Log where the medians span a decade: tokens/s across sequence lengths does, accuracy seldom.
    for axis, values, set_scale in ((ax.xaxis, [p.x for p in fr.points], ax.set_xscale),
                                    (ax.yaxis, [p.y for p in fr.points], ax.set_yscale)):
        if min(values) > 0 and max(values) / min(values) >= 10:
            set_scale("log")
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())

    ax.set_xlabel(f"{fr.x}  ({_direction(fr.maximize[0])})")
    ax.set_ylabel(f"{fr.y}  ({_direction(fr.maximize[1])})")
    varied = ", ".join(_short_keys(fr.label_keys).values())
    ax.set_title(f"{fr.y} vs {fr.x}: {len(front)} of {len(fr.points)} configurations on the Pareto front"
                 + (f"\nlabels: {varied}" if varied else ""), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=front_color, lw=1.5, marker="D", ms=7, label="Pareto front")]
    if len(front) < len(fr.points):
        handles.append(Line2D([], [], color=other_color, lw=0, marker="o", ms=6, mfc="white", label="dominated"))
    handles.append(Line2D([], [], color="0.2", lw=1, marker="|", ms=10, mew=1, label=f"bars: {SPREAD}"))
    n = sorted({p.n for p in fr.points})
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title=f"median of seeds\n(n = {n[0]}{f' to {n[-1]}' if len(n) > 1 else ''} per configuration)",
              title_fontsize=8, alignment="left")
    fig.tight_layout()
    _annotate(fig, ax, fr.points)  # after the layout: it checks label boxes against the final axes
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def _annotate(fig: Any, ax: Any, points: list[Point]) -> None:
    """Each point's label at the first of a few offsets where it stays inside the axes and overlaps
    no label placed before (front points first, so theirs get the best spots)."""
    offsets = [(6, 6), (6, -12), (-6, 6), (-6, -12), (6, 16), (-6, 16), (6, -22), (-6, -22)]
    placed: list[Any] = []
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)

    def put(p: Point, dx: int, dy: int) -> Any:
        return ax.annotate(p.label, (p.x, p.y), xytext=(dx, dy), textcoords="offset points",
                           ha="left" if dx > 0 else "right", fontsize=7.5, zorder=4,
                           fontweight="bold" if p.on_front else "normal", color="black" if p.on_front else "0.3",
                           # A light backing keeps a label legible where it crosses the step line or a bar.
                           bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})

    for p in sorted(points, key=lambda p: not p.on_front):
        fallback = None
        for dx, dy in offsets:
            text = put(p, dx, dy)
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            fallback = fallback or (inside and (dx, dy)) or None
            text.remove()
        else:
            # Crowded: the first spot inside the axes (else the default one) is better than no label.
            placed.append(put(p, *(fallback or offsets[0])).get_window_extent(renderer))


# -- command line (called by dilexp.compare) ---------------------------------------------------


def run_frontier(runs: list[Run], args: argparse.Namespace, where: Sequence[tuple[str, str]] = ()) -> int:
    """``--frontier``: print (or write with --out) the front and save the plot; 2 on a usage error."""
    # Caught here, not in compare.main: under `python -m dilexp.compare` that module is __main__,
    # whose CompareError is another class than the dilexp.compare one raised here.
    try:
        return _run_frontier(runs, args, where)
    except (CompareError, OSError) as e:  # OSError: an --out or --plot path that cannot be written
        print(f"dilexp.compare: {e}", file=sys.stderr)
        return 2


def _run_frontier(runs: list[Run], args: argparse.Namespace, where: Sequence[tuple[str, str]]) -> int:
    minimize = set(args.minimize or ())
    fr = build_frontier(runs, args.x or DEFAULT_X, args.y or DEFAULT_Y, ("x" not in minimize, "y" not in minimize),
                        where)
    for note in fr.skipped:
        print(f"dilexp.compare: frontier: skipped {note}", file=sys.stderr)
    out, png = args.out, args.plot
    if out is not None and out.suffix.lower() in (".png", ".svg", ".pdf") and png is None:
        out, png = None, out  # --out picture.png: the picture is what was asked for
    png = png or Path("frontier.png")
    fmt = args.format or ({".md": "md", ".csv": "csv"}.get(out.suffix.lower(), "table") if out else "table")
    text = render_front(fr, fmt, args.width)
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"dilexp.compare: wrote {out}", file=sys.stderr)
    plot_frontier(fr, png)
    print(f"dilexp.compare: wrote {png} ({fr.y} vs {fr.x}, {len(fr.front)} of {len(fr.points)} configurations "
          "on the front)", file=sys.stderr)
    return 0
