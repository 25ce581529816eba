"""The Lightning data module: wraps a train and a val dataset with their loaders."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from dilexp.data.docs import DocumentCorpus, PackedDocuments
from dilexp.data.recall import RecallDataset
from dilexp.data.text import TextTokens, TokenWindows
from dilexp.errors import ConfigError


class DataModule(L.LightningDataModule):
    def __init__(self, train: Dataset, val: Dataset, vocab_size: int, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.vocab_size, self.batch_size, self.num_workers = vocab_size, batch_size, num_workers
        # Whether the trainer's ranks each take their own batches (DDP) or share them (context parallel).
        self.data_parallel = True

    def train_dataloader(self) -> DataLoader:
        from dilexp.resume import StartAt, consumed_samples

        # Resumed from a checkpoint: continue with the first sequence the stopped run had not seen.
        trainer = getattr(self, "trainer", None)
        step = int(trainer.global_step) if trainer is not None else 0
        ranks = trainer.world_size if trainer is not None and self.data_parallel else 1
        start = consumed_samples(step, self.batch_size, ranks, len(self.train_set))  # type: ignore[arg-type]
        sampler = StartAt(len(self.train_set), start) if start else None  # type: ignore[arg-type]
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


def build_datamodule(data: Any, batch_size: int, seed: int) -> DataModule:
    """From the `data` config node; every setting is checked here, before any training."""
    if batch_size < 1:
        raise ConfigError("task.batch_size", batch_size, "must be >= 1")
    seq_len = int(data.seq_len)
    if seq_len < 1:
        raise ConfigError("data.seq_len", seq_len, "must be >= 1")
    workers = int(data.get("num_workers", 0))
    if data.name == "recall":
        common = dict(seq_len=seq_len, vocab_size=int(data.vocab_size), num_pairs=int(data.num_pairs),
                      num_queries=int(data.num_queries), seed=seed,
                      context_fraction=float(data.get("context_fraction", 0.5)),
                      filler=str(data.get("filler", "blank")), pair_layout=str(data.get("pair_layout", "spread")))
        train = RecallDataset(num_samples=int(data.train_samples), split="train", **common)
        val = RecallDataset(num_samples=int(data.val_samples), split="val", **common)
        return DataModule(train, val, train.vocab_size, batch_size, workers)
    if data.name == "text":
        tokens = TextTokens(data.path, data.get("tokenizer", "byte"))
        tr, va = tokens.split(float(data.val_fraction))
        train = TokenWindows(tr, seq_len, int(data.train_samples), seed, split=0)
        val = TokenWindows(va, seq_len, int(data.val_samples), seed, split=1)
        return DataModule(train, val, tokens.vocab_size, batch_size, workers)
    if data.name == "docs":
        corpus = DocumentCorpus(data.path, str(data.get("field", "text")), data.get("tokenizer", "byte"))
        tr_docs, va_docs = corpus.split(float(data.val_fraction), seed)
        train = PackedDocuments(tr_docs, corpus.eod, seq_len, int(data.train_samples), seed, split=0)
        val = PackedDocuments(va_docs, corpus.eod, seq_len, int(data.val_samples), seed, split=1)
        return DataModule(train, val, corpus.vocab_size, batch_size, workers)
    raise ConfigError("data.name", data.name, "choose 'recall', 'text' or 'docs'")
