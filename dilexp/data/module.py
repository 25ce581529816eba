"""The Lightning data module: wraps a train and a val dataset with their loaders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler

from dilexp.data.docs import DocumentCorpus, PackedDocuments
from dilexp.data.recall import RecallDataset
from dilexp.data.text import TextTokens, TokenWindows
from dilexp.errors import ConfigError


class Strided(Sampler[int]):
    """Replica ``rank`` of ``replicas`` reads samples rank, rank + replicas, ... (lazily: the
    training set is drawn on demand and may hold 10^8 samples, which torch's DistributedSampler
    would first list). Replica r's i-th sample is the single-process order's sample
    i * replicas + r, so the replicas' batches of a step together are the next global batch.
    ``start``: the first pass begins at that sample of the global order (a resumed run's
    position); later passes begin at 0."""

    def __init__(self, size: int, replicas: int, rank: int, start: int = 0) -> None:
        self.size, self.replicas, self.rank, self.start = size, replicas, rank, start

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        end = start + (self.size - start) // self.replicas * self.replicas
        return iter(range(start + self.rank, end, self.replicas))

    def __len__(self) -> int:
        return (self.size - self.start) // self.replicas


class DataModule(L.LightningDataModule):
    def __init__(self, train: Dataset, val: Dataset, vocab_size: int, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.vocab_size, self.batch_size, self.num_workers = vocab_size, batch_size, num_workers
        # Whether the trainer's ranks each take their own batches (DDP) or share them (context parallel).
        self.data_parallel = True
        # (replicas, this replica) once the process group exists; set by hardware=cp, whose
        # context-parallel ranks of one replica read the same batches.
        self.replica: Callable[[], tuple[int, int]] | None = None

    def _loader(self, data: Any, drop_last: bool, start: int = 0) -> DataLoader:
        sampler = None
        if self.replica is not None:
            replicas, rank = self.replica()
            if replicas > 1 or start:
                sampler = Strided(len(data), replicas, rank, start)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          drop_last=drop_last, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        from dilexp.resume import StartAt, consumed_samples

        # Resumed from a checkpoint: continue with the first sequence the stopped run had not seen
        # (a step takes batch_size x accumulation sequences on each replica).
        trainer = getattr(self, "trainer", None)
        step = int(trainer.global_step) if trainer is not None else 0
        per_replica = self.batch_size * (int(trainer.accumulate_grad_batches) if trainer is not None else 1)
        if self.replica is not None:
            # hardware=cp: the dp replicas take turns along one global order.
            start = consumed_samples(step, per_replica, self.replica()[0], len(self.train_set))  # type: ignore[arg-type]
            return self._loader(self.train_set, drop_last=True, start=start)
        ranks = trainer.world_size if trainer is not None and self.data_parallel else 1
        start = consumed_samples(step, per_replica, ranks, len(self.train_set))  # type: ignore[arg-type]
        sampler = StartAt(len(self.train_set), start) if start else None  # type: ignore[arg-type]
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, drop_last=False)


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
