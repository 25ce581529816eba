"""Character- or byte-level tokens of any local text file, split into train and val."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from dilexp.errors import ConfigError


class TextTokens:
    """A whole file as one token stream; the vocabulary is bytes (256) or the file's characters."""

    def __init__(self, path: str | Path | None, tokenizer: str = "byte") -> None:
        if path in (None, ""):
            raise ConfigError("data.path", path, "set it to a text file, e.g. data.path=corpus.txt")
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise ConfigError("data.path", str(path), "no such file")
        raw = p.read_bytes()
        if not raw:
            raise ConfigError("data.path", str(path), "the file is empty")
        if tokenizer == "byte":
            self.vocab_size = 256
            self.tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.long)
            self.chars: list[str] | None = None
        elif tokenizer == "char":
            text = raw.decode("utf-8", errors="replace")
            self.chars = sorted(set(text))
            index = {c: i for i, c in enumerate(self.chars)}
            self.vocab_size = len(self.chars)
            self.tokens = torch.tensor([index[c] for c in text], dtype=torch.long)
        else:
            raise ConfigError("data.tokenizer", tokenizer, "choose 'byte' or 'char'")

    def split(self, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError("data.val_fraction", val_fraction, "must be in (0, 1)")
        cut = int(len(self.tokens) * (1.0 - val_fraction))
        return self.tokens[:cut], self.tokens[cut:]


class TokenWindows(Dataset):
    """Windows of seq_len + 1 tokens at positions drawn per index (deterministic per seed)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, num_samples: int, seed: int, split: int = 0) -> None:
        if len(tokens) < seq_len + 1:
            raise ConfigError(
                "data.seq_len", seq_len, f"longer than a split of the file ({len(tokens)} tokens); lower it"
            )
        self.tokens, self.seq_len, self.num_samples = tokens, seq_len, num_samples
        self.seed, self.split = seed, split

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + i) * 3 + self.split)
        start = int(torch.randint(0, len(self.tokens) - self.seq_len, (1,), generator=g))
        chunk = self.tokens[start : start + self.seq_len + 1]
        return {
            "input_ids": chunk[:-1],
            "targets": chunk[1:],
            "loss_mask": torch.ones(self.seq_len, dtype=torch.bool),
        }
