"""The exactness study's table, plot and verdict from the task=check records of sweep.sh.

    python experiments/exactness/tables.py outputs/exactness [--out experiments/exactness]

Reads every summary.json below the folder (one per task=check job) and writes
``results.md`` (the table + the goals checked) and ``exactness.png`` (worst relative error
against world size / chunks) into ``--out``. Relative error is max|x - ref| / max|ref| per
tensor (task=check); "worst" is the largest over out, lse, dq, dk, dv.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

QUANTITIES = ("out", "lse", "dq", "dk", "dv")
DTYPES = {"32-true": "fp32", "bf16-mixed": "bf16"}


def load(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        if s.get("task") != "check":
            continue
        cfg, m = s.get("config", {}), s.get("metrics", {})
        att, hw = cfg.get("attention", {}), cfg.get("hardware", {})
        row: dict[str, Any] = {
            "variant": att.get("name"), "dtype": DTYPES.get(str(hw.get("precision")), str(hw.get("precision"))),
            "n": cfg.get("data", {}).get("seq_len"), "status": s.get("status"), "folder": str(path.parent),
            "ranks": int(m.get("check/world", hw.get("devices", 1))) if hw.get("context_parallel") else 1,
            "chunks": att.get("chunks", 1), "error": s.get("error"), "tol": m.get("check/tol"),
        }
        for q in QUANTITIES:
            for kind in ("max_abs", "max_rel", "bitwise"):
                row[f"{q}/{kind}"] = m.get(f"check/{q}/{kind}")
            for kind in ("max_abs", "max_rel"):
                row[f"dense/{q}/{kind}"] = m.get(f"check/dense/{q}/{kind}")
        row["passed"] = passes(row) if s.get("status") == "completed" else None
        rows.append(row)
    return rows


def passes(row: dict[str, Any]) -> float:
    """task=check's gate, max|err| <= tol * max(1, max|ref|), recomputed from the record (so
    records written before the gate took the reference's scale read the same)."""
    for q in QUANTITIES:
        a, r = row.get(f"{q}/max_abs"), row.get(f"{q}/max_rel")
        if isinstance(a, (int, float)) and isinstance(r, (int, float)):
            scale = a / r if r > 0 else 0.0
            if not a <= row["tol"] * max(1.0, scale):
                return 0.0
    return 1.0


def worst(row: dict[str, Any], kind: str = "max_rel", prefix: str = "") -> float | None:
    vals = [row.get(f"{prefix}{q}/{kind}") for q in QUANTITIES]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return max(vals) if vals else None


def dense_ratio(row: dict[str, Any]) -> float | None:
    """max over quantities of (variant's max abs error) / (dense same-dtype max abs error)."""
    ratios = []
    for q in ("out", "dq", "dk", "dv"):
        a, d = row.get(f"{q}/max_abs"), row.get(f"dense/{q}/max_abs")
        if isinstance(a, (int, float)) and isinstance(d, (int, float)) and d > 0:
            ratios.append(a / d)
    return max(ratios) if ratios else None


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2e}" if math.isfinite(x) else str(x)
    return str(x)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| variant | N | dtype | ranks | chunks | out rel | lse rel | dq rel | dk rel | dv rel | worst abs "
            "| dense worst abs | / dense | bitwise | pass |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        bits = [r.get(f"{q}/bitwise") for q in QUANTITIES if r.get(f"{q}/bitwise") is not None]
        lines.append("| " + " | ".join([
            str(r["variant"]), str(r["n"]), r["dtype"], str(r["ranks"]), str(r["chunks"]),
            *(fmt(r.get(f"{q}/max_rel")) for q in QUANTITIES),
            fmt(worst(r, "max_abs")), fmt(worst(r, "max_abs", "dense/")), fmt(dense_ratio(r)),
            ("yes" if all(b == 1.0 for b in bits) else "NO") if bits else "-",
            {1.0: "yes", 0.0: "NO"}.get(r["passed"], r["status"]),
        ]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, dtype in zip(axes, ("fp32", "bf16"), strict=True):
        series: dict[tuple, list[tuple[int, float]]] = {}
        dense: dict[int, list[float]] = {}
        for r in rows:
            if r["dtype"] != dtype or not r["variant"].startswith("ring") or worst(r) is None:
                continue
            if r["ranks"] > 1:
                key, x = (r["variant"], r["n"], "gloo ranks"), r["ranks"]
            else:
                key, x = (r["variant"], r["n"], "chunks, 1 process"), r["chunks"]
            series.setdefault(key, []).append((x, worst(r)))
            d = worst(r, "max_rel", "dense/")
            if d is not None:
                dense.setdefault(r["n"], []).append(d)
        for (variant, n, kind), pts in sorted(series.items()):
            if kind == "gloo ranks":  # the 1-rank point is the 1-chunk run of the same sweep group
                ones = [p for (v, nn, k), ps in series.items() if v == variant and nn == n and k != kind
                        for p in ps if p[0] == 1]
                pts = pts + ones[:1]
            pts = sorted(set(pts))
            style = "-o" if kind == "gloo ranks" else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{variant} N={n} ({kind})")
        for n, vals in sorted(dense.items()):
            ax.axhline(max(vals), color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"dense {dtype} N={n}", (1, max(vals)), fontsize=7, color="grey",
                        textcoords="offset points", xytext=(2, 2))
        if dtype == "fp32":
            ax.axhline(1e-5, color="red", linewidth=1)
            ax.annotate("goal 1e-5", (1, 1e-5), fontsize=7, color="red", textcoords="offset points", xytext=(2, 2))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("world size (gloo ranks) or chunks (one process)")
        ax.set_title(f"{dtype}: worst relative error vs float64")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
    axes[0].set_ylabel("max|err| / max|ref|, worst of out, lse, dq, dk, dv")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def verdict(rows: list[dict[str, Any]]) -> str:
    lines = []
    ok = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] != "completed"]
    fp32 = [r for r in ok if r["dtype"] == "fp32" and worst(r) is not None]
    if fp32:
        w = max(worst(r) for r in fp32)
        lines.append(f"- fp32: worst relative error {w:.2e} over {len(fp32)} runs "
                     f"(goal <= 1e-5: {'met' if w <= 1e-5 else 'MISSED'}).")
        for variant in sorted({r["variant"] for r in fp32 if r["variant"].startswith("ring")}):
            for n in sorted({r["n"] for r in fp32 if r["variant"] == variant}):
                ws = [worst(r) for r in fp32 if r["variant"] == variant and r["n"] == n]
                lines.append(f"  - {variant} N={n}: {min(ws):.2e} .. {max(ws):.2e} over ranks/chunks "
                             f"(max/min {max(ws) / min(ws):.2f}).")
    bf16 = [r for r in ok if r["dtype"] == "bf16" and dense_ratio(r) is not None]
    if bf16:
        ratio = max(dense_ratio(r) for r in bf16)
        lines.append(f"- bf16: worst (variant max abs error / dense bf16 max abs error) {ratio:.2f} over "
                     f"{len(bf16)} runs (goal <= 2: {'met' if ratio <= 2 else 'MISSED'}).")
    bits = [r for r in ok if any(r.get(f"{q}/bitwise") == 0.0 for q in QUANTITIES)]
    lines.append(f"- repeats bitwise equal: {len(ok) - len(bits)} of {len(ok)} runs" +
                 ("" if not bits else "; not: " + ", ".join(f"{r['variant']} {r['dtype']} ranks={r['ranks']}"
                                                            for r in bits)) + ".")
    passed = [r for r in ok if r["passed"] == 1.0]
    lines.append(f"- task=check passed: {len(passed)} of {len(ok)} completed runs.")
    if failed:
        lines.append(f"- not completed: {len(failed)}: " + "; ".join(f"{r['folder']}: {r['error']}" for r in failed))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    rows = load(args.root)
    order = {"sdpa": 0, "dilated": 1, "improved": 2, "block_sparse": 3, "flex": 4, "ring_v2": 5, "ring_v3": 6}
    rows.sort(key=lambda r: (r["n"], order.get(r["variant"], 9), r["dtype"], r["ranks"], r["chunks"]))
    text = "\n\n".join([table(rows), verdict(rows)])
    (args.out / "results.md").write_text(text + "\n")
    plot(rows, args.out / "exactness.png")
    print(text)


if __name__ == "__main__":
    main()
