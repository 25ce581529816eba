"""Passkey retrieval: one key-value binding hidden in filler, asked for at the end.

A probe sequence of ``length`` input tokens holds filler everywhere except

- the binding ``k v`` at the position the requested ``depth`` (0: the start of the context,
  1: just before the question) points to;
- the query ``k`` as the last input token: the model's next-token prediction there is scored
  against ``v``.

It speaks the recall task's token language (dilexp/data/recall.py): blank filler 0, keys
``1..K``, values ``K+1..2K`` (or random filler from the tokens above, as the dataset has it), so a
model trained on recall can be asked without any new training. The grid runner takes any
callable ``logits = model(ids)``: plain torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

BLANK = 0


@dataclass(frozen=True)
class PasskeyVocab:
    """Where keys, values and filler live in the token space."""

    num_keys: int
    key0: int = 1
    # [lo, hi) of random filler tokens; None: every filler token is BLANK.
    filler: tuple[int, int] | None = None

    @property
    def val0(self) -> int:
        return self.key0 + self.num_keys

    @classmethod
    def from_recall(cls, ds: Any) -> PasskeyVocab:
        """The vocabulary of a RecallDataset (its keys, values and filler)."""
        filler = (int(ds.fill0), int(ds.vocab_size)) if getattr(ds, "filler", "blank") == "random" else None
        return cls(num_keys=int(ds.kv), key0=int(ds.key0), filler=filler)


def key_position(length: int, depth: float) -> int:
    """Where the key of a ``length``-token probe goes for ``depth`` in [0, 1].

    The pair needs two tokens before the query (the last input token), so the key's range is
    ``0 .. length - 3``; it goes to the position nearest ``depth * (length - 3)``.
    """
    if length < 3:
        raise ValueError(f"a passkey probe needs >= 3 tokens (key, value, query), got {length}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return round(depth * (length - 3))


def _cell_seed(seed: int, length: int, depth: float) -> int:
    # From the cell's values, not its index: adding a length or depth to the grid leaves the
    # other cells' probes as they were.
    return ((seed * 1_000_003 + length) * 10_007 + round(depth * 10_000)) % (2**62)


def passkey_batch(length: int, depth: float, samples: int, vocab: PasskeyVocab, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``samples`` probes of one grid cell: (ids (samples, length), answers (samples,), key position).

    Deterministic in (seed, length, depth).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    pos = key_position(length, depth)
    g = torch.Generator().manual_seed(_cell_seed(seed, length, depth))
    if vocab.filler is None:
        ids = torch.full((samples, length), BLANK, dtype=torch.long)
    else:
        ids = torch.randint(vocab.filler[0], vocab.filler[1], (samples, length), generator=g)
    keys = torch.randint(vocab.key0, vocab.key0 + vocab.num_keys, (samples,), generator=g)
    values = torch.randint(vocab.val0, vocab.val0 + vocab.num_keys, (samples,), generator=g)
    ids[:, pos], ids[:, pos + 1], ids[:, -1] = keys, values, keys
    return ids, values, pos


@dataclass
class PasskeyGrid:
    """Accuracy per (depth, length) cell: ``acc[i][j]`` is depth ``depths[i]`` at ``lengths[j]``."""

    lengths: list[int]
    depths: list[float]
    acc: list[list[float]]
    samples: int
    key_positions: list[list[int]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        cells = [a for row in self.acc for a in row]
        return sum(cells) / len(cells)

    def by_length(self) -> dict[int, float]:
        return {n: sum(row[j] for row in self.acc) / len(self.acc) for j, n in enumerate(self.lengths)}

    def metrics(self) -> dict[str, float]:
        """Flat figures for the run record: the overall mean and the mean at each length."""
        out = {"passkey/acc": self.mean}
        out.update({f"passkey/acc_len/{n}": a for n, a in self.by_length().items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"lengths": self.lengths, "depths": self.depths, "acc": self.acc, "samples": self.samples,
                "key_positions": self.key_positions}


def run_passkey(model: Callable[[torch.Tensor], torch.Tensor], lengths: Sequence[int], depths: Sequence[float],
                samples: int, vocab: PasskeyVocab, seed: int = 0, batch_size: int | None = None,
                device: torch.device | str | None = None) -> PasskeyGrid:
    """Accuracy of ``model`` on every (depth, length) cell.

    ``model(ids)`` returns logits, (B, N, vocab) or only the last position's (B, vocab); a probe
    counts as right when the argmax at the last position is its value. ``batch_size`` bounds how
    many probes go through the model at once (long lengths), default: a cell at a time.
    """
    step = batch_size or samples
    acc: list[list[float]] = []
    where: list[list[int]] = []
    with torch.no_grad():
        for depth in depths:
            acc.append([])
            where.append([])
            for length in lengths:
                ids, answers, pos = passkey_batch(int(length), float(depth), samples, vocab, seed)
                right = 0
                for lo in range(0, samples, step):
                    chunk = ids[lo:lo + step]
                    logits = model(chunk if device is None else chunk.to(device))
                    last = logits[:, -1] if logits.dim() == 3 else logits
                    right += int((last.argmax(-1).cpu() == answers[lo:lo + step]).sum())
                acc[-1].append(right / samples)
                where[-1].append(pos)
    return PasskeyGrid(lengths=[int(n) for n in lengths], depths=[float(d) for d in depths], acc=acc,
                       samples=samples, key_positions=where)
