"""Packed documents (issue 18): a corpus of documents, packed into sequences with an
end-of-document token; every batch carries each token's document id.

The corpus is a folder of text files (one document per file, sorted by path, hidden files
skipped) or a JSONL file (one document per line, its text under ``data.field``). Tokens are
bytes (256 + the end-of-document token) or the corpus's characters (+ the token), as
``data=text``. Documents are split into train and val whole; each split's documents, in an
order drawn from the seed, are concatenated with the end-of-document token after each and
cut into windows of ``seq_len + 1`` tokens. A document that does not fit in one window is
split there: each piece is its own document in its sequence (attention never crosses a
window either). Document ids restart at 0 in every sequence, so ``DocumentLayout`` reads
them directly.

The target of an end-of-document token is the next document's first token, which no
document-masked model can know: its loss is masked (``loss_mask``), with or without a layout,
so packed-with-masks and packed-without-masks are scored on the same targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dilexp.errors import ConfigError


def read_documents(path: str | Path | None, field: str = "text") -> list[str]:
    """The corpus's non-empty documents, in a fixed order; one-line errors naming data.path."""
    if path in (None, ""):
        raise ConfigError("data.path", path, "set it to a folder of text files or a JSONL file, "
                          "e.g. data.path=corpus/")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise ConfigError("data.path", str(path), "no such file or folder")
    try:
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            docs = [f.read_bytes().decode("utf-8", errors="replace") for f in files]
        else:
            docs = _jsonl_documents(p, str(path), field)
    except OSError as e:
        raise ConfigError("data.path", str(path), f"unreadable: {e.strerror or e}") from None
    docs = [d for d in docs if d]
    if not docs:
        raise ConfigError("data.path", str(path), "the corpus is empty: no non-empty document")
    return docs


def _jsonl_documents(p: Path, shown: str, field: str) -> list[str]:
    docs = []
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError("data.path", shown, f"line {lineno} is not JSON: expected a JSONL file "
                                  "(or a folder of text files)") from None
            if not isinstance(entry, dict) or not isinstance(entry.get(field), str):
                raise ConfigError("data.field", field, f"line {lineno} of {shown} has no text field {field!r}")
            docs.append(entry[field])
    return docs


class DocumentCorpus:
    """Tokenized documents (without the end-of-document token) and the vocabulary."""

    def __init__(self, path: str | Path | None, field: str = "text", tokenizer: str = "byte") -> None:
        if tokenizer not in ("byte", "char"):
            raise ConfigError("data.tokenizer", tokenizer, "choose 'byte' or 'char'")
        texts = read_documents(path, field)
        if tokenizer == "byte":
            self.chars: list[str] | None = None
            self.docs = [torch.frombuffer(bytearray(t.encode("utf-8")), dtype=torch.uint8).to(torch.long)
                         for t in texts]
            self.eod = 256
        else:
            self.chars = sorted(set().union(*texts))
            index = {c: i for i, c in enumerate(self.chars)}
            self.docs = [torch.tensor([index[c] for c in t], dtype=torch.long) for t in texts]
            self.eod = len(self.chars)
        self.vocab_size = self.eod + 1
        self.path = str(path)

    def split(self, val_fraction: float, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Whole documents into (train, val), the val ones drawn from the seed."""
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError("data.val_fraction", val_fraction, "must be in (0, 1)")
        if len(self.docs) < 2:
            raise ConfigError("data.path", self.path, "needs at least 2 documents: val takes whole documents")
        order = torch.randperm(len(self.docs), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
        val, train = order[:n_val], order[n_val:]
        return [self.docs[i] for i in sorted(train)], [self.docs[i] for i in sorted(val)]


class PackedDocuments(Dataset):
    """``num_samples`` packed sequences of ``seq_len`` tokens: input_ids, targets, loss_mask, doc_ids.

    The split is packed once (document order drawn from ``seed``) into windows; sample i is
    window ``perm_e[i % W]`` of epoch e = i // W, a permutation per epoch drawn from the seed.
    """

    def __init__(self, docs: list[torch.Tensor], eod: int, seq_len: int, num_samples: int, seed: int,
                 split: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed * 7 + split)
        order = torch.randperm(len(docs), generator=gen).tolist()
        pieces, ids = [], []
        for j, i in enumerate(order):
            d = torch.cat([docs[i], torch.tensor([eod])])
            pieces.append(d)
            ids.append(torch.full((len(d),), j, dtype=torch.long))
        stream, stream_ids = torch.cat(pieces), torch.cat(ids)
        self.windows = (len(stream) - 1) // seq_len
        if self.windows < 1:
            raise ConfigError("data.seq_len", seq_len, f"longer than a split of the corpus ({len(stream)} tokens); "
                              "lower it or add documents")
        self.stream, self.stream_ids = stream, stream_ids
        self.seq_len, self.num_samples, self.seed, self.split = seq_len, num_samples, seed, split
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _window(self, i: int) -> int:
        epoch, j = divmod(i, self.windows)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 3 + self.split)
            self._perms = {epoch: torch.randperm(self.windows, generator=g).tolist()}
        return self._perms[epoch][j]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = self._window(i) * self.seq_len
        chunk = self.stream[start:start + self.seq_len + 1]
        ids = self.stream_ids[start:start + self.seq_len + 1]
        doc_ids = ids[:-1] - ids[0]  # restart at 0: a piece of a long document is a document here
        return {
            "input_ids": chunk[:-1],
            "targets": chunk[1:],
            # the next document's first token is not predictable inside a document
            "loss_mask": ids[1:] == ids[:-1],
            "doc_ids": doc_ids,
        }
