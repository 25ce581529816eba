"""Packed documents: where each document starts in each batch row (issue 18).

A ``DocumentLayout`` is the one description every attention variant, the dense reference and
the model read: per batch row, the start offsets of its documents. It is frozen and hashable
and carries its own ``key``, so per-layout plans (index tensors, block tables, masks) go
through the pattern cache like the per-length ones and a step builds them once for all layers.

Contract (DESIGN-level): for each document, a variant called with ``docs=layout`` computes
exactly what it computes for a sequence of that document's length alone. A layout with one
document per row is "no layout" (``trivial``): variants then behave exactly as without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch


@dataclass(frozen=True)
class DocumentLayout:
    """``n``: sequence length; ``rows[b]``: sorted start offsets of row b's documents (first 0)."""

    n: int
    rows: tuple[tuple[int, ...], ...]
    # The pattern-cache key; computed once so a lookup per layer does not rebuild it.
    key: tuple[Any, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = int(self.n)
        if n < 1:
            raise ValueError(f"DocumentLayout: n must be >= 1, got {self.n}")
        rows = tuple(tuple(int(s) for s in r) for r in self.rows)
        if not rows:
            raise ValueError("DocumentLayout: needs at least one row")
        for b, starts in enumerate(rows):
            if not starts or starts[0] != 0:
                raise ValueError(f"DocumentLayout: row {b} must start a document at 0, got {starts}")
            if any(a >= c for a, c in pairwise(starts)) or starts[-1] >= n:
                raise ValueError(f"DocumentLayout: row {b}'s starts must increase strictly and stay < n={n}, "
                                 f"got {starts}")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "key", ("docs", n, rows))

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> DocumentLayout:
        """From per-token document ids (B, N) (or (N,)): a document starts wherever the id changes.

        Ids need only be constant within a document (e.g. 0, 0, 1, 1, 1, 2); one device sync.
        """
        ids = doc_ids.reshape(1, -1) if doc_ids.dim() == 1 else doc_ids
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise ValueError(f"DocumentLayout.from_doc_ids: expected (B, N) ids, got {tuple(doc_ids.shape)}")
        b, n = ids.shape
        change = (ids[:, 1:] != ids[:, :-1]).nonzero().tolist()  # [[row, pos - 1], ...]
        starts: list[list[int]] = [[0] for _ in range(b)]
        for row, pos in change:
            starts[row].append(pos + 1)
        return cls(n, tuple(tuple(s) for s in starts))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Sequence[int] | torch.Tensor, n: int) -> DocumentLayout:
        """From flash-attention-style cumulative lengths over the flattened (B * n) batch:
        ``[0, l0, l0 + l1, ..., B * n]``. Every row boundary (a multiple of ``n``) must be one
        of them: a document never crosses rows."""
        cu = [int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
        if len(cu) < 2 or cu[0] != 0 or cu[-1] % n or any(a >= c for a, c in pairwise(cu)):
            raise ValueError(f"DocumentLayout.from_cu_seqlens: need increasing [0, ..., B*{n}], got {cu}")
        batch = cu[-1] // n
        bounds = set(cu)
        if any(r * n not in bounds for r in range(batch)):
            raise ValueError("DocumentLayout.from_cu_seqlens: a document crosses a row boundary")
        rows = tuple(tuple(c - r * n for c in cu if r * n <= c < (r + 1) * n) for r in range(batch))
        return cls(n, rows)

    @classmethod
    def single(cls, batch: int, n: int) -> DocumentLayout:
        """One document per row: the layout that means "no layout"."""
        return cls(n, ((0,),) * batch)

    # -- reading -----------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def trivial(self) -> bool:
        """One document per row: variants must behave exactly as if no layout were given."""
        return all(len(r) == 1 for r in self.rows)

    @property
    def same_for_all_rows(self) -> bool:
        return all(r == self.rows[0] for r in self.rows)

    @property
    def num_documents(self) -> int:
        return sum(len(r) for r in self.rows)

    def spans(self, row: int) -> list[tuple[int, int]]:
        """[(start, stop), ...] of row ``row``'s documents."""
        starts = self.rows[row]
        return list(zip(starts, (*starts[1:], self.n), strict=True))

    def lengths(self, row: int) -> list[int]:
        return [stop - start for start, stop in self.spans(row)]

    def cu_seqlens(self) -> list[int]:
        """Cumulative lengths over the flattened (B * n) batch (the inverse of ``from_cu_seqlens``)."""
        out = [r * self.n + s for r, starts in enumerate(self.rows) for s in starts]
        return out + [self.batch * self.n]

    def doc_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, N) int64: index of each token's document within its row (0, 0, 1, 1, 1, 2, ...)."""
        marks = torch.zeros(self.batch, self.n, dtype=torch.int64)
        for b, starts in enumerate(self.rows):
            if len(starts) > 1:
                marks[b, list(starts[1:])] = 1
        return marks.cumsum(1).to(device)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, N) int64: each token's position within its document (rotary positions restart)."""
        pos = torch.arange(self.n, dtype=torch.int64).repeat(self.batch, 1)
        for b in range(self.batch):
            for start, stop in self.spans(b)[1:]:
                pos[b, start:stop] -= start
        return pos.to(device)

    def restrict(self, row: int) -> DocumentLayout:
        """The one-row layout of row ``row``."""
        return DocumentLayout(self.n, (self.rows[row],))


def as_layout(docs: DocumentLayout | None) -> DocumentLayout | None:
    """None for "no layout" (None or one document per row), else the layout itself."""
    if docs is None:
        return None
    if not isinstance(docs, DocumentLayout):
        raise TypeError(f"docs= must be a DocumentLayout, got {type(docs).__name__}")
    return None if docs.trivial else docs


# A plan that runs documents as batches: ((L, index (count, L)), ...) and the inverse
# permutation that puts the concatenated results back in (B * N) token order.
GroupPlan = tuple[tuple[tuple[int, torch.Tensor], ...], torch.Tensor]
# Padded buckets: ((L, index (count, L), valid (count, L) bool, kept (valid slots,) into the
# flattened (count * L) slots, padded: bool), ...) and the inverse over the kept slots.
BucketPlan = tuple[tuple[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, bool], ...], torch.Tensor]


def group_plan(layout: DocumentLayout) -> GroupPlan:
    """Documents grouped by exact length: each group runs as one batch of equal-length
    sequences, so a variant is called once per distinct length, not once per document.
    Indices are into the flattened (B * N) tokens."""
    by_len: dict[int, list[int]] = {}
    for r in range(layout.batch):
        for a, b in layout.spans(r):
            by_len.setdefault(b - a, []).append(r * layout.n + a)
    groups, order = [], []
    for length in sorted(by_len):
        idx = torch.tensor(by_len[length], dtype=torch.int64)[:, None] + torch.arange(length)
        groups.append((length, idx))
        order.append(idx.reshape(-1))
    return tuple(groups), torch.argsort(torch.cat(order))


def bucket_size(length: int, min_size: int = 16) -> int:
    """``length`` rounded up to a multiple of an eighth of its power of two (at least
    ``min_size``): at most 8 bucket sizes per octave, at most ~27% more pairs than the
    document's own."""
    step = max(min_size, 1 << max(0, (length - 1).bit_length() - 3))
    return -(-length // step) * step


def bucket_plan(layout: DocumentLayout, min_size: int = 16, multiple: int | None = None) -> BucketPlan:
    """Documents padded to buckets (``bucket_size``, at most ``n``; or, with ``multiple``, to
    the next multiple of it): one batched kernel call per bucket. Padding slots repeat the
    document's first token (``valid`` False); the caller keeps them from being keys."""
    by_size: dict[int, list[tuple[int, int]]] = {}
    for r in range(layout.batch):
        for a, b in layout.spans(r):
            if multiple is not None:
                size = -(-(b - a) // multiple) * multiple
            else:
                size = min(layout.n, bucket_size(b - a, min_size))
            by_size.setdefault(size, []).append((r * layout.n + a, b - a))
    buckets, order = [], []
    for size in sorted(by_size):
        starts = torch.tensor([s for s, _ in by_size[size]], dtype=torch.int64)[:, None]
        lens = torch.tensor([m for _, m in by_size[size]], dtype=torch.int64)[:, None]
        offs = torch.arange(size)[None, :]
        valid = offs < lens
        idx = starts + torch.where(valid, offs, 0)
        buckets.append((size, idx, valid, valid.reshape(-1).nonzero().squeeze(1), not bool(valid.all())))
        order.append(idx[valid])
    return tuple(buckets), torch.argsort(torch.cat(order))
