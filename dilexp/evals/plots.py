"""Figures of the quality evals (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

from dilexp.evals.passkey import PasskeyGrid


def passkey_heatmap(grid: PasskeyGrid, path: str | Path, title: str | None = None,
                    train_len: int | None = None) -> Path:
    """The grid as a heatmap: depth down, length across, accuracy in each cell, colour bar 0..1.

    ``train_len``: the training length; the length ticks then also say the multiple of it, which
    is what a length-extrapolation reader looks for.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = np.asarray(grid.acc, dtype=float)
    rows, cols = acc.shape
    fig, ax = plt.subplots(figsize=(2.2 + 1.0 * cols, 1.6 + 0.55 * rows))
    cmap = plt.get_cmap("RdYlGn")
    im = ax.imshow(acc, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(rows):
        for j in range(cols):
            r, g, b, _ = cmap(acc[i, j])
            # Dark text on the light middle of the map, white on its dark ends.
            dark = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=10,
                    color="black" if dark else "white")

    def length_label(n: int) -> str:
        if not train_len:
            return str(n)
        return f"{n}\n({n / train_len:g}x)"

    ax.set_xticks(range(cols), [length_label(n) for n in grid.lengths])
    ax.set_yticks(range(rows), [f"{d:.0%}" for d in grid.depths])
    ax.set_xlabel("context length (tokens)" + (f" and multiple of the training length {train_len}"
                                               if train_len else ""))
    ax.set_ylabel("key depth (0% = start)")
    ax.set_title(title or f"passkey retrieval, {grid.samples} probes per cell", fontsize=11)
    bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    bar.set_label("accuracy")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
