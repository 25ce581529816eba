"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023): the default, synthetic task.

A sequence of ``seq_len + 1`` tokens (inputs: the first ``seq_len``, targets: the last) holds

- a context part ``[0, C)``, ``C = context_fraction * (seq_len + 1)``: ``num_pairs`` key-value pairs
  ``k v`` with distinct keys, at random non-overlapping places spread over the whole part
  (``pair_layout=packed``: back to back from position 0, as Zoology lays them out);
- a query part ``[C, seq_len + 1)``: ``num_queries`` queries ``k v`` at random non-overlapping places,
  each key bound in the context part (no key is asked twice while there are keys not yet asked);
- filler everywhere else: one blank token (``filler=blank``, Zoology's zeros) or random tokens of
  their own range (``filler=random``).

The model is scored on the answers only (the value after each query key): the loss mask marks the
query keys' positions. Bindings are drawn per sequence, so nothing can be memorised, and sequence
``i`` of a split depends only on (seed, split, i): deterministic per seed whatever the batching,
and the validation split never repeats a training sequence's draw.

Places are not aligned to even offsets: a dilated pattern's offsets must not decide, by the
parity of the layout, which pairs it can see.

Each item also carries ``distance``: for an answer position, how far back the key was last seen
(the key->query distance a pattern must span); 0 elsewhere. Evals bin accuracy by it.

Tokens: 0 = blank, keys ``1..K``, values ``K+1..2K``, random filler above; ``K = (vocab - 1) // 2``
with the blank filler and ``(vocab - 1) // 4`` with random filler (two quarters stay filler).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from dilexp.errors import ConfigError

BLANK = 0
FILLERS = ("blank", "random")
PAIR_LAYOUTS = ("spread", "packed")


def num_keys(vocab_size: int, filler: str) -> int:
    """How many key (and value) tokens a vocabulary holds with this filler."""
    return (vocab_size - 1) // (2 if filler == "blank" else 4)


def split_point(seq_len: int, context_fraction: float) -> int:
    """First position of the query part, in a sequence of seq_len + 1 tokens."""
    return int(round(context_fraction * (seq_len + 1)))


def spaced_starts(count: int, span: int, g: torch.Generator) -> torch.Tensor:
    """Sorted starts of ``count`` non-overlapping two-token places in ``[0, span)``, uniform over
    all such arrangements (choose ``count`` of ``span - count`` gaps, then add the places' widths)."""
    picks = torch.randperm(span - count, generator=g)[:count].sort().values
    return picks + torch.arange(count)


def check_recall_settings(seq_len: int, vocab_size: int, num_pairs: int, num_queries: int,
                          context_fraction: float = 0.5, filler: str = "blank",
                          pair_layout: str = "spread") -> None:
    """Every recall setting, checked before any work; each error names its field."""
    if filler not in FILLERS:
        raise ConfigError("data.filler", filler, f"choose one of {list(FILLERS)}")
    if pair_layout not in PAIR_LAYOUTS:
        raise ConfigError("data.pair_layout", pair_layout, f"choose one of {list(PAIR_LAYOUTS)}")
    if seq_len < 4:
        raise ConfigError("data.seq_len", seq_len, "must be >= 4 (a pair and a query)")
    if vocab_size < 5:
        raise ConfigError("data.vocab_size", vocab_size, "must be >= 5 (blank, keys, values)")
    if not 0.0 < context_fraction < 1.0:
        raise ConfigError("data.context_fraction", context_fraction, "must be in (0, 1)")
    keys = num_keys(vocab_size, filler)
    if num_pairs < 1 or num_pairs > keys:
        raise ConfigError("data.num_pairs", num_pairs,
                          f"must be in [1, {keys}] (distinct keys of vocab {vocab_size} with {filler} filler)")
    if num_queries < 1:
        raise ConfigError("data.num_queries", num_queries, "must be >= 1")
    c = split_point(seq_len, context_fraction)
    if c < 2 * num_pairs:
        raise ConfigError("data.seq_len", seq_len,
                          f"the context part ({c} tokens) cannot hold {num_pairs} pairs; "
                          "raise data.seq_len or data.context_fraction, or lower data.num_pairs")
    if seq_len + 1 - c < 2 * num_queries:
        raise ConfigError("data.num_queries", num_queries,
                          f"the query part ({seq_len + 1 - c} tokens) holds at most {(seq_len + 1 - c) // 2} "
                          "queries; lower it, raise data.seq_len, or lower data.context_fraction")


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
        context_fraction: float = 0.5,
        filler: str = "blank",
        pair_layout: str = "spread",
    ) -> None:
        check_recall_settings(seq_len, vocab_size, num_pairs, num_queries, context_fraction, filler, pair_layout)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.num_samples, self.seed, self.split = num_samples, seed, self.SPLITS[split]
        self.filler, self.pair_layout = filler, pair_layout
        self.kv = num_keys(vocab_size, filler)
        self.key0, self.val0, self.fill0 = 1, 1 + self.kv, 1 + 2 * self.kv
        self.split_at = split_point(seq_len, context_fraction)

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess over the value tokens (the field's chance level)."""
        return 1.0 / self.kv

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + i) * 3 + self.split)
        total, c = self.seq_len + 1, self.split_at
        if self.filler == "blank":
            seq = torch.full((total,), BLANK, dtype=torch.long)
        else:
            seq = torch.randint(self.fill0, self.vocab_size, (total,), generator=g)
        keys = torch.randperm(self.kv, generator=g)[: self.num_pairs] + self.key0
        vals = torch.randint(self.val0, self.val0 + self.kv, (self.num_pairs,), generator=g)

        if self.pair_layout == "packed":
            slots = 2 * torch.arange(self.num_pairs)
        else:
            slots = spaced_starts(self.num_pairs, c, g)  # the keys are in random order already
        seq[slots], seq[slots + 1] = keys, vals

        q_slots = c + spaced_starts(self.num_queries, total - c, g)
        rounds = -(-self.num_queries // self.num_pairs)
        pick = torch.cat([torch.randperm(self.num_pairs, generator=g) for _ in range(rounds)])[: self.num_queries]
        seq[q_slots], seq[q_slots + 1] = keys[pick], vals[pick]

        # Where each key was last seen before each query: its pair, or an earlier query of it.
        last_seen = slots.clone()
        distance = torch.zeros(self.seq_len, dtype=torch.long)
        for q, j in zip(q_slots.tolist(), pick.tolist(), strict=True):
            distance[q] = q - int(last_seen[j])
            last_seen[j] = q

        mask = distance > 0  # the target at a query key's position is its answer
        return {"input_ids": seq[:-1], "targets": seq[1:], "loss_mask": mask, "distance": distance}
