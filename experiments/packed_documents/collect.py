"""Tables of the packed_documents study from the run folders of run.sh (markdown on stdout).

    python experiments/packed_documents/collect.py /tmp/packed_documents
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path


def _f(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return math.nan


def _fmt(x: float, spec: str = ".1f") -> str:
    return "-" if not math.isfinite(x) else format(x, spec)


def _pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.2f}%"


def attention_table(out: Path) -> list[str]:
    lines = ["| documents | variant | mode | N | ms with docs | ms without | with / without | build share (cpu) "
             "| build share (none) | ms with docs, cache=none |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in sorted(out.glob("attn_*")):
        rows = list(csv.DictReader((run / "bench.csv").open()))
        for n in sorted({int(r["seq_len"]) for r in rows}):
            by = {r["role"]: r for r in rows if int(r["seq_len"]) == n}
            main, nodocs, none = by.get("main", {}), by.get("nodocs", {}), by.get("compare_cache", {})
            if main.get("status") != "ok":
                lines.append(f"| {main.get('docs', '?')} | {main.get('variant', '?')} | {main.get('mode', '?')} "
                             f"| {n} | {main.get('status')}: {main.get('error', '')[:60]} | | | | | |")
                continue
            lines.append(
                f"| {main['docs']} | {main['variant']} | {main['mode']} | {n} | {_fmt(_f(main, 'median_ms'))} | "
                f"{_fmt(_f(nodocs, 'median_ms'))} | {_fmt(_f(main, 'docs_vs_nodocs'), '.2f')} | "
                f"{_pct(_f(main, 'docs_build_share'))} | {_pct(_f(none, 'docs_build_share'))} | "
                f"{_fmt(_f(none, 'median_ms'))} |")
    return lines


def model_table(out: Path) -> list[str]:
    lines = ["| variant | cache | step ms | build share | layout + builds per step, ms | plan builds per step "
             "| same tokens without docs, ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for run in sorted(out.glob("model_*")):
        rows = list(csv.DictReader((run / "bench.csv").open()))
        nodocs = next((r for r in rows if r["role"] == "nodocs"), {})
        for r in rows:
            if r["role"] not in ("main", "compare_cache") or r.get("status") != "ok":
                continue
            calls = 1 + 5  # warm-up + repeats (bench.memory_pass=false)
            lines.append(
                f"| {r['variant']} | {r['cache_strategy']} | {_fmt(_f(r, 'median_ms'))} | "
                f"{_pct(_f(r, 'docs_build_share'))} | {_fmt(_f(r, 'docs_layout_ms'), '.2f')} | "
                f"{_fmt(_f(r, 'cache/misses') / calls, '.1f')} | {_fmt(_f(nodocs, 'median_ms'))} |")
    return lines


def lm_table(out: Path) -> list[str]:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("lm*/lm.json"))]
    if not runs:
        return ["(no lm run)"]
    s = runs[0]
    lines = [f"{s['documents']} documents (mean {s['mean_doc_tokens']:.0f} tokens with the end token), "
             f"seq_len {s['seq_len']}, batch {s['batch']}, {s['steps']} steps = {s['tokens']:,} tokens per run, "
             f"{s['model']}, attention={s['attention']}, seeds {len(runs)}", "",
             "| seed | training | val loss, documents alone | val loss, packed as trained | last train loss |",
             "|---:|---|---:|---:|---:|"]
    for seed, run in enumerate(runs):
        for name, r in run["results"].items():
            lines.append(f"| {seed} | {name.replace('_', ' ')} | {r['val_loss_alone']:.4f} | "
                         f"{r['val_loss_packed']:.4f} | {r['train_loss_last']:.4f} |")
    for name in runs[0]["results"]:
        mean = sum(r["results"][name]["val_loss_alone"] for r in runs) / len(runs)
        lines.append(f"| mean | {name.replace('_', ' ')} | {mean:.4f} | | |")
    return lines


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/packed_documents")
    for title, lines in (("attention layer", attention_table(out)), ("LM step", model_table(out)),
                         ("causal LM", lm_table(out))):
        print(f"### {title}\n")
        print("\n".join(lines))
        print()


if __name__ == "__main__":
    main()
