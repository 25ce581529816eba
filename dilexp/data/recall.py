"""Multi-query associative recall over a long context: the default, synthetic task.

Each sequence scatters ``num_pairs`` key-value pairs (distinct keys) over a context of
filler tokens, then a separator, then ``num_queries`` queries: a key seen earlier
followed by its value. The model is scored on the answers (the value after each query
key), so loss and accuracy measure recall across the whole context. Sequence ``i`` of a
split depends only on (seed, split, i): deterministic per seed, whatever the batching.

Token layout: 0 = separator, then ``kv`` key tokens, ``kv`` value tokens, and the rest
filler, with kv = (vocab_size - 1) // 4.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from dilexp.errors import ConfigError

SEPARATOR = 0


def check_recall_settings(seq_len: int, vocab_size: int, num_pairs: int, num_queries: int) -> None:
    if seq_len < 1:
        raise ConfigError("data.seq_len", seq_len, "must be >= 1")
    if vocab_size < 9:
        raise ConfigError("data.vocab_size", vocab_size, "must be >= 9 (separator, keys, values, filler)")
    kv = (vocab_size - 1) // 4
    if num_pairs < 1 or num_pairs > kv:
        raise ConfigError("data.num_pairs", num_pairs,
                          f"must be in [1, {kv}] (distinct keys of vocab {vocab_size})")
    if num_queries < 1:
        raise ConfigError("data.num_queries", num_queries, "must be >= 1")
    needed = 2 * num_pairs + 1 + 2 * num_queries
    if seq_len + 1 < needed:
        raise ConfigError(
            "data.seq_len", seq_len,
            f"too short for {num_pairs} pairs and {num_queries} queries (needs >= {needed - 1})",
        )


class RecallDataset(Dataset):
    SPLITS = {"train": 0, "val": 1, "test": 2}

    def __init__(
        self,
        seq_len: int,
        vocab_size: int = 64,
        num_pairs: int = 8,
        num_queries: int = 8,
        num_samples: int = 10_000,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        check_recall_settings(seq_len, vocab_size, num_pairs, num_queries)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.num_samples, self.seed, self.split = num_samples, seed, self.SPLITS[split]
        self.kv = (vocab_size - 1) // 4
        self.key0, self.val0, self.fill0 = 1, 1 + self.kv, 1 + 2 * self.kv

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + i) * 3 + self.split)
        total = self.seq_len + 1
        seq = torch.randint(self.fill0, self.vocab_size, (total,), generator=g)
        keys = torch.randperm(self.kv, generator=g)[: self.num_pairs] + self.key0
        vals = torch.randint(self.val0, self.val0 + self.kv, (self.num_pairs,), generator=g)

        tail = 1 + 2 * self.num_queries
        ctx = total - tail
        # Pairs sit at distinct even offsets spread over the whole context.
        slots = torch.randperm(ctx // 2, generator=g)[: self.num_pairs] * 2
        seq[slots] = keys
        seq[slots + 1] = vals
        seq[ctx] = SEPARATOR
        pick = torch.randint(0, self.num_pairs, (self.num_queries,), generator=g)
        q_pos = ctx + 1 + 2 * torch.arange(self.num_queries)
        seq[q_pos] = keys[pick]
        seq[q_pos + 1] = vals[pick]

        inputs, targets = seq[:-1], seq[1:]
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[q_pos] = True  # the target at a query key's position is its answer
        return {"input_ids": inputs, "targets": targets, "loss_mask": mask}
