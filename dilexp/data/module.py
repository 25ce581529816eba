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

    def _replica_start(self) -> int:
        """hardware=cp resumed from a checkpoint: where in the global order the next step begins
        (every step takes batch_size x accumulation x replicas sequences)."""
        trainer = self.trainer
        if self.replica is None or trainer is None or trainer.global_step <= 0:
            return 0
        per_step = self.batch_size * int(trainer.accumulate_grad_batches) * self.replica()[0]
        per_epoch = len(self.train_set) // per_step  # type: ignore[arg-type]
        return (trainer.global_step % per_epoch) * per_step if per_epoch else 0

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, drop_last=True, start=self._replica_start())

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
