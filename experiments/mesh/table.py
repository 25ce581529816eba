"""The mesh table from a run.sh sweep: one row per (dp x cp, shard_model), read from each job's summary.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: Path) -> None:
    rows = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        hw, m = s["config"]["hardware"], s.get("metrics", {})
        if s.get("status") != "completed":
            rows.append((0, 0, hw.get("shard_model"), f"| {hw.get('cp_size')} | {hw.get('shard_model')} | "
                         f"{s.get('status')} | | | | | |"))
            continue
        dp, cp = int(m["mesh/dp"]), int(m["mesh/cp"])
        rows.append((-dp, cp, hw["shard_model"],
                     f"| {dp} x {cp} | {str(hw['shard_model']).lower()} | {m['perf/tokens_per_s_median']:.0f} | "
                     f"{m['perf/tokens_per_s_per_device_median']:.0f} | {m['perf/step_ms_median']:.0f} | "
                     f"{m['memory/model_state_mb']:.1f} | {m['memory/peak_rss_mb']:.0f} | "
                     f"{m['train/loss_last']:.4f} |"))
    print("| mesh (dp x cp) | shard_model | tok/s total | tok/s per device | step ms | model state per rank (MB) | "
          "peak RSS rank 0 (MB) | last train loss |")
    print("|---|---|---|---|---|---|---|---|")
    for *_, line in sorted(rows):
        print(line)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/mesh"))
