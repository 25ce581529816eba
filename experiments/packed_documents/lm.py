"""The study's causal-LM comparison: packed-with-masks vs packed-without-masks after the same tokens.

A document corpus is cut from a text file (one document per blank-line-separated passage,
e.g. a speech of tinyshakespeare) into a folder, read by ``data=docs``'s own classes, and two
identical models (same seed, same batches, same token count) train on it: one passes each
batch's layout to every attention layer (no attention across documents), the other does not
(the same packed sequences, attention across documents). Both are scored on the same val
windows two ways: "alone" (with the layout: each document as its own sequence, what a model
is asked at inference on one document) and "packed" (each as it was trained). The
end-of-document targets are masked in both (``loss_mask``), so the same targets count.

    python experiments/packed_documents/lm.py --text ../shared/data/tinyshakespeare.txt --out /tmp/pd_lm
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dilexp.attention import build
from dilexp.data.docs import DocumentCorpus, PackedDocuments
from dilexp.models.gpt import GPT, GPTConfig
from dilexp.patterns.documents import DocumentLayout


def write_corpus(text_path: Path, out: Path) -> int:
    """One file per blank-line-separated passage; returns the document count."""
    passages = [p.strip() + "\n" for p in text_path.read_text().split("\n\n") if p.strip()]
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(passages):
        (out / f"{i:05d}.txt").write_text(p)
    return len(passages)


def batches(ds: PackedDocuments, batch: int, count: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for s in range(count):
        items = [ds[s * batch + j] for j in range(batch)]
        out.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return out


def loss_of(model: GPT, b: dict[str, torch.Tensor], masked: bool) -> torch.Tensor:
    docs = DocumentLayout.from_doc_ids(b["doc_ids"]) if masked else None
    logits = model(b["input_ids"], docs=docs)
    per = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), reduction="none")
    keep = b["loss_mask"].flatten().float()
    return (per * keep).sum() / keep.sum()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--attention", default="improved")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    corpus_dir = args.out / "corpus"
    n_docs = write_corpus(args.text, corpus_dir)
    corpus = DocumentCorpus(corpus_dir, tokenizer="byte")
    train_docs, val_docs = corpus.split(0.1, args.seed)
    train = PackedDocuments(train_docs, corpus.eod, args.seq_len, args.steps * args.batch, args.seed, split=0)
    val = PackedDocuments(val_docs, corpus.eod, args.seq_len, args.val_batches * args.batch, args.seed, split=1)
    train_b, val_b = batches(train, args.batch, args.steps), batches(val, args.batch, args.val_batches)
    lengths = [len(d) + 1 for d in corpus.docs]

    cfg = GPTConfig(vocab_size=corpus.vocab_size, n_layer=2, n_head=4, d_model=128)
    settings = {"segment_lengths": [64, 128, 256], "dilation_rates": [1, 2, 4]} if args.attention != "sdpa" else {}
    results: dict[str, dict[str, float]] = {}
    for masked in (True, False):
        torch.manual_seed(args.seed)
        model = GPT(cfg, lambda: build(args.attention, num_heads=cfg.n_head, head_dim=cfg.head_dim, **settings))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        t0 = time.perf_counter()
        for b in train_b:
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model, b, masked)
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            alone = sum(loss_of(model, b, True).item() for b in val_b) / len(val_b)
            packed = sum(loss_of(model, b, masked).item() for b in val_b) / len(val_b)
        name = "packed_with_masks" if masked else "packed_without_masks"
        results[name] = {"val_loss_alone": alone, "val_loss_packed": packed, "train_loss_last": loss.item(),
                         "train_s": train_s, "bits_per_byte_alone": alone / math.log(2)}
        print(name, json.dumps(results[name]), flush=True)
    summary = {"documents": n_docs, "mean_doc_tokens": sum(lengths) / len(lengths), "seq_len": args.seq_len,
               "batch": args.batch, "steps": args.steps, "tokens": args.steps * args.batch * args.seq_len,
               "attention": args.attention, "model": "2x128, 4 heads", "results": results}
    (args.out / "lm.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
