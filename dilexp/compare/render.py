"""The three ways a table is written: the terminal (fitted to its width), Markdown and CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from dilexp.compare.runs import _num
from dilexp.compare.table import Table

_STYLE = {"completed": "green", "failed": "bold red", "oom": "bold red", "error": "bold red"}


_GAP = 2  # spaces between columns


def _wrap_words(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width``, broken only at spaces (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


@dataclass
class _Column:
    name: str
    heading: str
    cells: list[str]
    right: bool

    @property
    def width(self) -> int:
        # Cells never break; a heading breaks at its spaces down to its longest word.
        return max([len(c) for c in self.cells] + [len(w) for w in self.heading.split()] + [1])


def _columns(t: Table) -> list[_Column]:
    cells = [t.cells(row, errors=False) for row in t.rows]
    out = []
    for name, heading in t.columns():
        texts = [str(c[name]) for c in cells]
        # Numbers right-aligned: metrics, and settings whose every value is one (seq_len).
        numeric = name in t.metrics or name in ("n", "ratio") or (
            name in t.keys and all(_num(x) is not None or x == "-" for x in texts))
        out.append(_Column(name, heading, texts, numeric))
    return out


def _blocks(t: Table, columns: list[_Column], width: int) -> list[list[_Column]]:
    """The columns in blocks that each fit ``width``: the ones that say which row is which
    (status, n, the varying settings), then as many of the others as fit; a wide table
    becomes several narrower ones, stacked."""
    lead_names = {"status", "n", *t.keys}
    lead = [c for c in columns if c.name in lead_names]
    rest = [c for c in columns if c.name not in lead_names]

    def span(cols: list[_Column]) -> int:
        return sum(c.width for c in cols) + _GAP * (len(cols) - 1)

    blocks: list[list[_Column]] = [[]]
    for col in rest:
        if blocks[-1] and span(lead + blocks[-1] + [col]) > width:
            blocks.append([])
        blocks[-1].append(col)
    return [lead + b for b in blocks]


def _lines(t: Table, cols: list[_Column]) -> list[Any]:
    """The block's heading lines, rule and rows, as styled rich Texts."""
    from rich.text import Text

    depth = max(len(_wrap_words(c.heading, c.width)) for c in cols)
    heads = []
    for c in cols:
        words = _wrap_words(c.heading, c.width)
        heads.append([""] * (depth - len(words)) + words)  # headings sit on the rule
    out = []
    for i in range(depth):
        out.append(Text(" " * _GAP).join(
            Text(h[i].rjust(c.width) if c.right else h[i].ljust(c.width), style="bold") for c, h in zip(cols, heads,
                                                                                                         strict=True)))
    out.append(Text("-" * (sum(c.width for c in cols) + _GAP * (len(cols) - 1)), style="dim"))
    for r, row in enumerate(t.rows):
        unclear = row.note == "no clear difference"
        parts = []
        for c in cols:
            text = c.cells[r].rjust(c.width) if c.right else c.cells[r].ljust(c.width)
            style = _STYLE.get(row.status, "yellow") if c.name == "status" else \
                "yellow" if unclear and c.name in ("ratio", "ci", "note") else ""
            parts.append(Text(text, style=style))
        line = Text(" " * _GAP).join(parts)
        line.rstrip()
        out.append(line)
    return out


def render_rich(tables: list[Table], file: Any = None, width: int | None = None) -> None:
    """Each table on the terminal (or ``file``) within ``width`` (default: the terminal's; 80
    when piped): no number, path or setting is broken, headings wrap at their spaces, and a
    table too wide comes in parts that repeat the columns saying which row is which."""
    from rich.console import Console
    from rich.text import Text

    console = Console(file=file, width=width, highlight=False)
    for t in tables:
        columns = _columns(t)
        blocks = _blocks(t, columns, console.width)
        for i, cols in enumerate(blocks):
            title = t.title if len(blocks) == 1 else f"{t.title} ({i + 1}/{len(blocks)})"
            console.print(Text(title, style="bold"))
            for line in _lines(t, cols):
                console.print(line, no_wrap=True, overflow="ignore", crop=False)
            console.print()
        if t.caption():
            console.print(Text(t.caption(), style="dim"))
        # A failed row's error, below the table rather than widening it.
        for row in t.rows:
            if row.error and row.status != "completed":
                console.print(Text(f"{t.cells(row, errors=False)['run']}: {row.error[:300]}", style="red"))


def render_markdown(tables: list[Table]) -> str:
    """Every table as Markdown, numbers formatted as on the terminal, errors in the run cell."""
    out = []
    for t in tables:
        out.append(f"### {t.title}\n")
        if t.caption():
            out.append(f"{t.caption()}\n")
        cols = t.columns()
        out.append("| " + " | ".join(title for _, title in cols) + " |")
        out.append("|" + "|".join("---:" if name in t.metrics or name == "ratio" else "---" for name, _ in cols) + "|")
        for row in t.rows:
            cells = t.cells(row)
            out.append("| " + " | ".join(str(cells[name]).replace("|", "\\|") for name, _ in cols) + " |")
        out.append("")
    return "\n".join(out)


def render_csv(tables: list[Table]) -> str:
    """Every table in one CSV, full precision, metric keys as column names."""
    header: list[str] = ["table"]
    for t in tables:
        for name, _ in t.columns():
            names = ["ci_low", "ci_high"] if name == "ci" else [name]
            header += [n for n in names if n not in header]
    if any(r.error for t in tables for r in t.rows):
        header.append("error")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for t in tables:
        for row in t.rows:
            cells = t.cells(row, fmt=False)
            w.writerow([t.kind] + [cells.get(h, "") for h in header[1:]])
    return buf.getvalue()

