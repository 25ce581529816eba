#!/usr/bin/env bash
# Tables of experiments/long_context from the run folders under outputs/long_context/.
# Run from the repository root after train.sh, train_long.sh, memory.sh and longer.sh.
set -eu
echo '## training runs'
python - <<'PY'
import json, csv, os
base = "outputs/long_context/train"
print("| variant | N | steps | tokens | val/acc | val/loss | train loss first -> last | tokens/s (median step) | step ms p25-p75 | peak RSS MB | wall s | status |")
print("|" + "---|" * 12)
for v in ["sdpa", "dilated", "ring_v3"]:
    for n in [2048, 8192, 32768, 65536, 131072]:
        p = f"{base}/{v}_{n}/summary.json"
        if not os.path.exists(p):
            print(f"| {v} | {n} | (not run) |"); continue
        s = json.load(open(p)); m = s["metrics"]
        if s["status"] != "completed":
            print(f"| {v} | {n} | ({s['status']}) |"); continue
        steps = int(m.get("train/steps", 0))
        print(f"| {v} | {n} | {steps} | {steps*n:,} | {m.get('val/acc', float('nan')):.3f} | {m.get('val/loss', float('nan')):.3f} | "
              f"{m.get('train/loss_first', float('nan')):.2f} -> {m.get('train/loss_last', float('nan')):.2f} | {m['perf/tokens_per_s_median']:,.0f} | "
              f"{m['perf/step_ms_p25']:.0f}-{m['perf/step_ms_p75']:.0f} | {m['memory/peak_rss_mb']:.0f} | {s['wall_s']:.0f} | {s['status']}")
PY
echo; echo '## memory of one training step (bench.target=model)'
python - <<'PY'
import csv, math
import numpy as np
GiB = 1024.0  # MiB
print("| variant | N range | peak alloc MiB per 1K tokens (slope) | intercept MiB | log-log exponent | peak RSS at largest N, MiB | N where alloc + 600 MiB idle process = 23.5 GiB MemTotal (extrapolated) | step s at largest N | practical N (step <= 60 s, t ~ N^k fit) |")
print("|" + "---|" * 9)
for v in ["sdpa", "dilated", "ring_v3"]:
    rows = [r for f in ([v, v + "_65536"] if v == "sdpa" else [v]) for r in csv.DictReader(open(f"outputs/long_context/memory/{f}/bench.csv")) if r["status"] == "ok"]
    n = np.array([float(r["seq_len"]) for r in rows]); a = np.array([float(r["peak_alloc_mb"]) for r in rows])
    t = np.array([float(r["median_ms"]) / 1e3 for r in rows]); rss = [float(r["peak_rss_since_reset_mb"]) for r in rows]
    b, c = np.polyfit(n, a, 1)
    k = np.polyfit(np.log(n), np.log(a), 1)[0]
    nmax = (23.5 * GiB - 600 - c) / b
    # time: fit log t vs log N over the two largest N
    kt, ct = np.polyfit(np.log(n[-2:]), np.log(t[-2:]), 1)
    npr = math.exp((math.log(60) - ct) / kt)
    print(f"| {v} | {int(n[0])}-{int(n[-1])} | {b*1024:.2f} | {c:.1f} | {k:.3f} | {rss[-1]:.0f} | {nmax/1024:,.0f}K ({nmax:,.0f}) | {t[-1]:.1f} | {npr/1024:,.0f}K (time exponent {kt:.2f}) |")
    print("   per N:", ", ".join(f"{int(x)}: {y:.0f} MiB / {s:.2f} s" for x, y, s in zip(n, a, t)))
PY
echo; echo '## 8x budget at 2K (longer.sh): val/acc by step'
python - <<'PY'
import csv, json, os
for v in ["dilated", "sdpa"]:
    d = f"outputs/long_context/longer/{v}_2048"
    if not os.path.exists(d + "/metrics.csv"):
        continue
    acc = [(r["step"], float(r["val/acc"]), float(r["val/loss"])) for r in csv.DictReader(open(d + "/metrics.csv")) if r.get("val/acc")]
    m = json.load(open(d + "/summary.json"))["metrics"]
    print(v, " ".join(f"step {s}: acc {a:.3f} loss {l:.3f};" for s, a, l in acc), f"tokens/s {m['perf/tokens_per_s_median']:,.0f}")
PY
echo; echo '## chance on the exact validation answers (uniform over the 15 values = 0.067; best constant answer:)'
python - <<'PY'
import collections
from dilexp.data.recall import RecallDataset
for n, nseq in [(2048, 8), (8192, 8), (32768, 8), (65536, 8), (131072, 8), (2048, 32)]:
    ds = RecallDataset(seq_len=n, vocab_size=64, num_pairs=12, num_queries=32, num_samples=32, seed=1234, split="val")
    c = collections.Counter()
    for i in range(nseq):
        b = ds[i]
        c.update(b["targets"][b["loss_mask"]].tolist())
    print(f"N={n} ({nseq} val sequences, {sum(c.values())} answers): best constant answer {c.most_common(1)[0][1] / sum(c.values()):.3f}")
PY
