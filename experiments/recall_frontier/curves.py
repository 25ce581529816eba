"""Learning curves of the study: val/acc against training sequences seen, one line per arm.

    python experiments/recall_frontier/curves.py [OUT_DIR] [PNG]

Reads every run folder's metrics.csv and .hydra/config.yaml below OUT_DIR (default
outputs/recall_frontier); seeds of one arm are drawn thin, their median thick.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def curve(run: Path) -> tuple[list[float], list[float]]:
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    batch = int(cfg.task.batch_size)
    xs, ys = [], []
    for row in csv.DictReader((run / "metrics.csv").open()):
        if row.get("val/acc"):
            xs.append((int(row["step"]) + 1) * batch)
            ys.append(float(row["val/acc"]))
    return xs, ys


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/recall_frontier")
    png = Path(sys.argv[2] if len(sys.argv) > 2 else "experiments/recall_frontier/curves.png")
    arms: dict[str, list[tuple[list[float], list[float]]]] = defaultdict(list)
    for metrics in sorted(root.glob("*/*/metrics.csv")):
        run = metrics.parent
        arm = run.parent.name
        if arm == "width" or arm.startswith("n1024"):
            continue
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        label = {"long": "sdpa, 4x the steps (long)"}.get(arm, arm)
        if arm.startswith("same_function"):
            label = f"{cfg.attention.name} (dilated_r2's pattern)"
        arms[label].append(curve(run))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    chance = None
    for i, (label, runs) in enumerate(sorted(arms.items())):
        color = f"C{i}"
        for xs, ys in runs:
            ax.plot(xs, ys, color=color, alpha=0.35, lw=0.8)
        longest = max(runs, key=lambda r: len(r[0]))[0]
        med = [statistics.median(r[1][j] for r in runs if len(r[1]) > j) for j in range(len(longest))]
        ax.plot(longest, med, color=color, lw=2, label=f"{label} (n={len(runs)})")
        chance = chance or 1 / 31
    ax.axhline(1 / 8, color="grey", ls=":", lw=1)
    ax.text(ax.get_xlim()[0], 1 / 8, " knows which values occur (1/8)", va="bottom", fontsize=8, color="grey")
    ax.axhline(chance, color="grey", ls="--", lw=1)
    ax.text(ax.get_xlim()[0], chance, " chance (1/31)", va="bottom", fontsize=8, color="grey")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}K"))
    ax.set_xlabel("training sequences seen (N = 256)")
    ax.set_ylabel("val/acc (256 sequences, 2048 answers)")
    ax.set_title("MQAR recall on a 2-core CPU: val/acc against sequences seen")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
