"""The three ways a table is written: the terminal (fitted to its width), Markdown and CSV."""

from __future__ import annotations

import csv
import io
from typing import Any

from dilexp.compare.table import Table

_STYLE = {"completed": "green", "failed": "bold red", "oom": "bold red", "error": "bold red"}


def _lead(t: Table) -> list[tuple[str, str]]:
    """The columns that say which row is which: repeated in every block of a split table."""
    names = {"status", "n", *t.keys}
    return [c for c in t.columns() if c[0] in names]


def _rich_table(t: Table, cols: list[tuple[str, str]], title: str | None, caption: str | None) -> Any:
    from rich import box
    from rich.markup import escape
    from rich.table import Table as RichTable

    # No vertical rules and no outer padding: columns, not lines, take the width.
    rt = RichTable(title=title, title_justify="left", caption=caption, caption_justify="left",
                   box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name, heading in cols:
        numeric = name in t.metrics or name in ("n", "ratio")
        # Numbers, paths and settings never break; only text with spaces wraps, at the spaces.
        rt.add_column(heading, justify="right" if numeric else "left", overflow="fold",
                      no_wrap=numeric or name in t.keys or name in ("ratio", "run"))
    for row in t.rows:
        cells = t.cells(row, errors=False)
        texts = [escape(str(cells[name])) for name, _ in cols]
        texts[0] = f"[{_STYLE.get(row.status, 'yellow')}]{texts[0]}[/]"
        if row.note == "no clear difference":
            texts = [f"[yellow]{x}[/]" if name in ("ratio", "ci", "note") else x
                     for (name, _), x in zip(cols, texts, strict=True)]
        rt.add_row(*texts)
    return rt


def _min_width(rt: Any) -> int:
    """The narrowest the table can be without breaking a word of any cell."""
    from rich.console import Console
    from rich.measure import Measurement

    wide = Console(width=100_000, file=io.StringIO())
    return Measurement.get(wide, wide.options, rt).minimum


def _blocks(t: Table, width: int) -> list[list[tuple[str, str]]]:
    """The table's columns in blocks that each fit ``width``: the identifying columns, then as
    many of the others as fit (a wide table becomes several narrower ones, stacked)."""
    lead = _lead(t)
    rest = [c for c in t.columns() if c not in lead]
    blocks: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for col in rest:
        if current and _min_width(_rich_table(t, lead + current + [col], None, None)) > width:
            blocks.append(current)
            current = []
        current.append(col)
    blocks.append(current)
    return [lead + b for b in blocks]


def render_rich(tables: list[Table], file: Any = None, width: int | None = None) -> None:
    """Each table on the terminal (or ``file``) within ``width`` (default: the terminal's; 80
    when piped): no number, path or setting is broken; a table too wide comes in parts."""
    from rich.console import Console
    from rich.text import Text

    console = Console(file=file, width=width, highlight=False)
    for t in tables:
        blocks = _blocks(t, console.width)
        for i, cols in enumerate(blocks):
            title = t.title if len(blocks) == 1 else f"{t.title} ({i + 1}/{len(blocks)})"
            caption = (t.caption() or None) if i == len(blocks) - 1 else None
            console.print(_rich_table(t, cols, title, caption))
        # A failed row's error, below the table rather than widening it.
        for row in t.rows:
            if row.error and row.status != "completed":
                console.print(Text(f"  {t.cells(row, errors=False)['run']}: {row.error[:300]}", style="red"))


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

