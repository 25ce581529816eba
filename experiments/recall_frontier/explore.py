"""The recipe search of this study: a plain-torch training loop over the project's GPT and recall data.

    python experiments/recall_frontier/explore.py --n 64 --layout packed --bs 64     # one row of the table

Prints val/acc (256 validation sequences) every 250 steps, and stops at 0.99 or after --secs.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from dilexp.attention import build
from dilexp.data.recall import RecallDataset
from dilexp.models import GPT, GPTConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--layout", default="spread", choices=("spread", "packed"))
    p.add_argument("--filler", default="blank", choices=("blank", "random"))
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--secs", type=float, default=600)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    def data(split: str, n: int) -> RecallDataset:
        return RecallDataset(seq_len=a.n, vocab_size=a.vocab, num_pairs=a.pairs, num_queries=a.queries,
                             num_samples=n, seed=a.seed, split=split, filler=a.filler, pair_layout=a.layout)

    def batch(ds: RecallDataset, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [ds[start + i] for i in range(size)]
        return tuple(torch.stack([it[k] for it in items]) for k in ("input_ids", "targets", "loss_mask"))

    train, val = data("train", 10**9), batch(data("val", 256), 0, 256)
    model = GPT(GPTConfig(vocab_size=a.vocab, n_layer=2, n_head=a.heads, d_model=a.d),
                lambda: build("sdpa", num_heads=a.heads, head_dim=a.d // a.heads))
    decay = [q for q in model.parameters() if q.dim() >= 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.98))
    t0 = time.time()
    for step in range(a.steps):
        scale = min(1.0, (step + 1) / a.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / a.steps)))
        for group in opt.param_groups:
            group["lr"] = a.lr * scale
        x, y, m = batch(train, step * a.bs, a.bs)
        logits = model(x)
        loss = F.cross_entropy(logits[m], y[m])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        if (step + 1) % 250 == 0:
            with torch.no_grad():
                acc = (model(val[0]).argmax(-1) == val[1])[val[2]].float().mean().item()
            secs = time.time() - t0
            print(f"step {step + 1} seqs {(step + 1) * a.bs} {secs:.0f}s loss {loss.item():.3f} val/acc {acc:.3f}",
                  flush=True)
            if acc >= 0.99 or secs > a.secs:
                break


if __name__ == "__main__":
    main()
