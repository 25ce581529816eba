"""Step 5 of run.sh: the sweeps' bench.csv files -> CSV + Markdown tables under OUT.

    python experiments/gpu/collect.py WORK OUT --seg-len 2048

WORK holds one folder per sweep (sdpa_full, sdpa_segment, dilated_improved, ring_v3, flex,
cache_pair, memory_pair, model), each with Hydra's job folders and their bench.csv. Writes
bench_rows.csv (every row, with its sweep), attention.md, pairs.md, model.md and goals.md.
TFLOP/s are the bench's own ``tflops`` column (dilexp.bench.flops, DESIGN section 8).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

VARIANTS = ("improved", "flex", "dilated", "ring_v3")
# Issue 17's goals: fraction of SDPA-flash's TFLOP/s at the same per-segment length.
GOAL_FRACTION = {"improved": 0.70, "flex": 0.60}
GOAL_RING_TIME = 1.3
GOAL_MFU = 0.40


def num(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key, "") or "nan")
    except ValueError:
        return math.nan


def first(row: dict[str, str], *keys: str) -> float:
    """The first of ``keys`` the row has a number for (bench column names changed once)."""
    return next((v for v in (num(row, k) for k in keys) if math.isfinite(v)), math.nan)


def fmt(x: float, digits: int = 1) -> str:
    return "—" if not math.isfinite(x) else f"{x:.{digits}f}"


def sig(x: float) -> str:
    """Three significant digits: TFLOP/s span 1e-4 (a CPU dry run) to 1e3."""
    return "—" if not math.isfinite(x) else f"{x:.3g}"


def read_rows(work: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(work.glob("*/*/bench.csv")):
        sweep = path.parent.parent.name
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                row["sweep"] = sweep
                rows.append(row)
    return rows


def write_csv(rows: list[dict[str, str]], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def attention_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r.get("target") == "attention" and r.get("role") == "main"]


def segment_ceiling(rows: list[dict[str, str]], seg_len: int) -> dict[tuple[str, str], float]:
    """(head_dim, mode) -> SDPA's TFLOP/s at the per-segment length."""
    return {(r["head_dim"], r["mode"]): num(r, "tflops") for r in attention_rows(rows)
            if r["sweep"] == "sdpa_segment" and int(r["seq_len"]) == seg_len and r["status"] == "ok"}


def attention_md(rows: list[dict[str, str]], seg_len: int) -> tuple[str, dict]:
    ceiling = segment_ceiling(rows, seg_len)
    full = {(r["head_dim"], r["mode"], r["seq_len"]): r for r in attention_rows(rows) if r["sweep"] == "sdpa_full"}
    found: dict = {}
    body = []
    for r in attention_rows(rows):
        if r["sweep"] not in ("dilated_improved", "ring_v3", "flex", "sdpa_full"):
            continue
        d, mode, n = r["head_dim"], r["mode"], r["seq_len"]
        tf = num(r, "tflops")
        seg = ceiling.get((d, mode), math.nan)
        f = full.get((d, mode, n))
        speed = num(f, "median_ms") / num(r, "median_ms") if f else math.nan
        found[(r["variant"], d, mode, int(n))] = r
        body.append([r["variant"], d, mode, n, r["status"], fmt(num(r, "median_ms"), 2), sig(tf),
                     fmt(100 * tf / seg) if math.isfinite(seg) else "—", fmt(speed, 2),
                     fmt(num(r, "peak_alloc_mb"), 0)])
    body.sort(key=lambda b: (int(b[1]), b[2], int(b[3]), b[0]))
    seg_line = ", ".join(f"D={d} {m}: {sig(v)}" for (d, m), v in sorted(ceiling.items()))
    counts = sorted({r.get("flop_count", "") for r in attention_rows(rows)} - {""})
    text = (f"SDPA at the per-segment length {seg_len} (same tokens as the longest N), TFLOP/s: "
            f"{seg_line or 'not measured'}\n\nFLOP count: {', '.join(counts) or 'as dilexp/bench/flops.py'}\n\n")
    text += table(["variant", "D", "mode", "N", "status", "median ms", "TFLOP/s", "% of SDPA@seg",
                   "speedup vs SDPA full", "peak MB"], body)
    return text, {"found": found, "ceiling": ceiling}


def pairs_md(rows: list[dict[str, str]]) -> str:
    body = []
    for r in rows:
        if r["sweep"] not in ("cache_pair", "memory_pair") or r.get("target") != "attention":
            continue
        if r.get("role") == "reference":
            continue
        body.append([r["sweep"], r["variant"], r.get("role", ""), r.get("cache_strategy", ""),
                     r.get("memory_kind", ""), r["seq_len"], r["status"], fmt(num(r, "median_ms"), 2),
                     fmt(num(r, "peak_alloc_mb"), 0), fmt(first(r, "cache/hit_rate", "cache_hit_rate"), 3),
                     fmt(first(r, "memory/pool_reuse_rate", "pool_reuse_rate"), 3)])
    return table(["pair", "variant", "role", "cache", "memory", "N", "status", "median ms", "peak MB",
                  "cache hit rate", "pool reuse rate"], body)


def peak_tflops() -> float | None:
    try:
        import torch

        from dilexp.telemetry.callbacks import peak_tflops as peak

        return peak(torch.device("cuda")) if torch.cuda.is_available() else None
    except ImportError:
        return None


def model_md(rows: list[dict[str, str]], gpu: bool = True) -> tuple[str, dict[str, float]]:
    peak = peak_tflops() if gpu else None  # the dry run skips the seconds of importing lightning
    body, mfu = [], {}
    for r in rows:
        if r.get("target") != "model" or r.get("role") == "reference":
            continue
        tf = num(r, "tflops")
        m = tf / peak if peak and math.isfinite(tf) else math.nan
        mfu[r["variant"]] = m
        body.append([r["variant"], r["seq_len"], r["status"], fmt(num(r, "median_ms"), 1),
                     fmt(num(r, "tokens_per_s"), 0), sig(tf), fmt(100 * m) if math.isfinite(m) else "—",
                     fmt(num(r, "peak_alloc_mb"), 0)])
    head = f"Peak used for MFU: {peak} TFLOP/s (dense bf16, datasheet)\n\n" if peak else "MFU: no GPU peak (CPU)\n\n"
    return head + table(["attention", "T", "status", "step ms", "tokens/s", "TFLOP/s (model count)", "MFU %",
                         "peak MB"], body), mfu


def bf16_verdict(pytest_log: Path) -> str:
    if not pytest_log.exists():
        return "not run"
    text = pytest_log.read_text()
    lines = [ln for ln in text.splitlines() if "test_bf16_error_within_twice_dense_bf16" in ln]
    if not lines:
        return "not run"
    passed = sum(ln.startswith("PASSED") for ln in lines)
    skipped = sum(ln.startswith("SKIPPED") for ln in lines)
    failed = sum(ln.startswith(("FAILED", "ERROR")) for ln in lines)
    if skipped and not passed and not failed:
        return "not measured (skipped: no CUDA)"
    return f"{passed} passed, {failed} failed"


def goals_md(att: dict, mfu: dict[str, float], pytest_log: Path, dry_run: bool) -> str:
    """One row per goal of issue 17: the figure and whether it holds. A dry run (CPU, tiny
    sizes) measures nothing: its verdicts all read "not yet measured"."""
    found, ceiling = att["found"], att["ceiling"]
    body = []

    def verdict(ok: bool | None) -> str:
        if ok is None or dry_run:
            return "not yet measured" + (" (dry run)" if dry_run else "")
        return "holds" if ok else "does not hold"

    for variant, goal in GOAL_FRACTION.items():
        fracs = [num(r, "tflops") / ceiling[(d, m)] for (v, d, m, _), r in found.items()
                 if v == variant and m == "fwd_bwd" and (d, m) in ceiling and r["status"] == "ok"]
        fracs = [f for f in fracs if math.isfinite(f)]
        worst = min(fracs) if fracs else math.nan
        body.append([f"{variant} fwd+bwd >= {goal:.0%} of SDPA-flash at the per-segment length",
                     "min " + fmt(100 * worst) + " %" if fracs else "—", verdict(None if not fracs else worst >= goal)])
    ratios, lower = [], []
    for (v, d, m, n), r in found.items():
        imp = found.get(("improved", d, m, n))
        if v != "ring_v3" or m != "fwd_bwd" or imp is None or "ok" not in (r["status"], imp["status"]):
            continue
        ratios.append(num(r, "median_ms") / num(imp, "median_ms"))
        lower.append(num(r, "peak_alloc_mb") < num(imp, "peak_alloc_mb"))
    ratios = [x for x in ratios if math.isfinite(x)]
    body.append([f"ring_v3 chunks=4 <= {GOAL_RING_TIME}x improved's time, lower peak",
                 f"max {fmt(max(ratios), 2)}x, lower peak {sum(lower)}/{len(lower)}" if ratios else "—",
                 verdict(None if not ratios else max(ratios) <= GOAL_RING_TIME and all(lower))])
    m = mfu.get("improved", math.nan)
    body.append([f"gpt2_124m T=8K >= {GOAL_MFU:.0%} MFU with improved", fmt(100 * m) + " %" if math.isfinite(m)
                 else "—", verdict(None if not math.isfinite(m) else m >= GOAL_MFU)])
    bf16 = bf16_verdict(pytest_log)
    ok = None if "not" in bf16 else bf16.endswith(" 0 failed")
    body.append(["every bf16 error within 2x dense bf16's (pytest -m gpu)", bf16, verdict(ok)])
    return table(["goal", "measured", "verdict"], body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seg-len", type=int, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal: no verdicts")
    a = ap.parse_args()
    rows = read_rows(a.work)
    if not rows:
        print("collect: no bench.csv under", a.work)
        return 1
    write_csv(rows, a.out / "bench_rows.csv")
    att_text, att = attention_md(rows, a.seg_len)
    model_text, mfu = model_md(rows, gpu=not a.dry_run)
    env = (a.out / "env.txt").read_text().splitlines() if (a.out / "env.txt").exists() else []
    machine = next((ln for ln in env if ln.startswith("device")), "device unknown")
    (a.out / "attention.md").write_text(f"# Attention, bf16 ({machine})\n\n{att_text}")
    (a.out / "pairs.md").write_text(f"# Pattern cache and memory pool pairs ({machine})\n\n{pairs_md(rows)}")
    (a.out / "model.md").write_text(f"# One LM training step ({machine})\n\n{model_text}")
    goals = goals_md(att, mfu, a.out / "pytest.txt", a.dry_run)
    (a.out / "goals.md").write_text(f"# Issue 17 goals ({machine})\n\n{goals}")
    failed = sorted({f"{r['sweep']}:{r['variant']}:{r['status']}" for r in rows if r["status"] not in ("ok",)})
    print(f"collect: {len(rows)} rows; not ok: {', '.join(failed) if failed else 'none'}")
    print(goals)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
