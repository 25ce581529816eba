"""The LongNet dilated pattern of DESIGN section 3, and its dense mask for small N.

A pattern is a list of (segment length w, dilation rate r) pairs. Under ``heads="grouped"``
the heads are split into len(pairs) groups (the first groups get one extra head when
H % m != 0) and group i uses pair i; under ``heads="all"`` every pair applies to every
head. Inside each segment [s, s + w) of the sequence a head with offset o selects
P = {p : (p - s) mod r == o}, and a query in P attends to the keys in P.

Offsets: ``"head"`` gives head h (its global index) o = h mod r (LongNet's per-head
offsets); ``"group"`` gives every head of group i o = i mod r. Under ``heads="all"`` the
offset is always h mod r.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dilexp.errors import ConfigError

OFFSET_MODES = ("head", "group")
HEAD_LAYOUTS = ("grouped", "all")


@dataclass(frozen=True)
class Branch:
    """One (w, r, o) applied to a set of heads: the unit every variant computes."""

    segment_length: int
    dilation_rate: int
    offset: int
    heads: tuple[int, ...]


@dataclass(frozen=True)
class DilatedPattern:
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    offsets: str = "head"
    heads: str = "grouped"

    @classmethod
    def from_config(
        cls,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        offsets: str = "head",
        heads: str = "grouped",
        prefix: str = "attention",
    ) -> DilatedPattern:
        """Validate settings and name the offending field (``attention.dilation_rates`` ...)."""
        try:
            seg = tuple(int(w) for w in segment_lengths)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{prefix}.segment_lengths", segment_lengths, "must be a list of ints") from e
        try:
            rates = tuple(int(r) for r in dilation_rates)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{prefix}.dilation_rates", dilation_rates, "must be a list of ints") from e
        if len(seg) == 0:
            raise ConfigError(f"{prefix}.segment_lengths", list(seg), "must not be empty")
        if len(seg) != len(rates):
            raise ConfigError(
                f"{prefix}.dilation_rates",
                list(rates),
                f"needs one rate per segment length ({len(seg)} segment lengths, {len(rates)} rates)",
            )
        for w in seg:
            if w < 1:
                raise ConfigError(f"{prefix}.segment_lengths", list(seg), f"every length must be >= 1, got {w}")
        for r in rates:
            if r < 1:
                raise ConfigError(f"{prefix}.dilation_rates", list(rates), f"every rate must be >= 1, got {r}")
        if offsets not in OFFSET_MODES:
            raise ConfigError(f"{prefix}.offsets", offsets, f"choose one of {list(OFFSET_MODES)}")
        if heads not in HEAD_LAYOUTS:
            raise ConfigError(f"{prefix}.heads", heads, f"choose one of {list(HEAD_LAYOUTS)}")
        return cls(seg, rates, offsets, heads)

    @property
    def num_pairs(self) -> int:
        return len(self.segment_lengths)

    def check_heads(self, num_heads: int, prefix: str = "model.n_head") -> None:
        if self.heads == "grouped" and num_heads < self.num_pairs:
            raise ConfigError(
                prefix, num_heads, f"heads='grouped' needs at least one head per segment length ({self.num_pairs})"
            )

    def head_groups(self, num_heads: int) -> list[range]:
        """Heads of each group, in order; the first H % m groups get one extra head."""
        m = self.num_pairs
        base, extra = divmod(num_heads, m)
        groups, start = [], 0
        for i in range(m):
            size = base + (1 if i < extra else 0)
            groups.append(range(start, start + size))
            start += size
        return groups

    def branches(self, num_heads: int) -> list[Branch]:
        """Every distinct (w, r, offset) and the heads that use it.

        Heads sharing (w, r, o) are batched together by the variants; under "all" a head
        appears in one branch per pair.
        """
        self.check_heads(num_heads)
        out: list[Branch] = []
        for i, (w, r) in enumerate(zip(self.segment_lengths, self.dilation_rates, strict=True)):
            if self.heads == "grouped":
                members = list(self.head_groups(num_heads)[i])
            else:
                members = list(range(num_heads))
            by_offset: dict[int, list[int]] = {}
            for h in members:
                o = (i % r) if (self.offsets == "group" and self.heads == "grouped") else (h % r)
                by_offset.setdefault(o, []).append(h)
            for o, hs in sorted(by_offset.items()):
                out.append(Branch(w, r, o, tuple(hs)))
        return out

    def dense_multiplicity(self, n: int, num_heads: int) -> torch.Tensor:
        """(H, N, N) int64: how many pairs let query q see key k (0 = masked). No causal mask."""
        pos = torch.arange(n)
        mult = torch.zeros(num_heads, n, n, dtype=torch.int64)
        for b in self.branches(num_heads):
            selected = (pos % b.segment_length) % b.dilation_rate == b.offset
            seg = pos // b.segment_length
            allowed = selected[:, None] & selected[None, :] & (seg[:, None] == seg[None, :])
            mult[list(b.heads)] += allowed.to(torch.int64)
        return mult

    def multiplicity_rows(self, n: int, num_heads: int, head: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of ``dense_multiplicity(n, num_heads)[head]``, (stop - start, N) int64,
        built without the (H, N, N) tensor (the same rule, evaluated on a row block)."""
        pos = torch.arange(n)
        rows = pos[start:stop]
        mult = torch.zeros(len(rows), n, dtype=torch.int64)
        for b in self.branches(num_heads):
            if head not in b.heads:
                continue
            selected = (pos % b.segment_length) % b.dilation_rate == b.offset
            seg = pos // b.segment_length
            allowed = selected[rows, None] & selected[None, :] & (seg[rows, None] == seg[None, :])
            mult += allowed.to(torch.int64)
        return mult


def allowed_pairs(pattern: DilatedPattern, n: int, num_heads: int, causal: bool) -> int:
    """Query-key pairs the pattern computes, summed over heads (with multiplicity), in O(branches * segments).

    The useful-FLOP count of benchmarks: no dense mask, so it works at any N.
    """
    total = 0
    for b in pattern.branches(num_heads):
        w = b.segment_length
        for s in range(0, n, w):
            length = min(w, n - s)
            sel = 0 if b.offset >= length else -(-(length - b.offset) // b.dilation_rate)
            total += len(b.heads) * (sel * (sel + 1) // 2 if causal else sel * sel)
    return total


def segment_positions(n: int, w: int, r: int, o: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected positions of every segment, padded: (idx (S, L) int64, valid (S, L) bool).

    S = ceil(n / w) segments, L = ceil(w / r) slots per segment; slots beyond the
    sequence (last, shorter segment) or beyond the segment are invalid and point at 0.
    """
    w = min(w, n) if n > 0 else w
    num_seg = -(-n // w)
    slots = -(-w // r)
    starts = torch.arange(num_seg).unsqueeze(1) * w
    within = o + torch.arange(slots).unsqueeze(0) * r
    idx = starts + within
    valid = (within < w) & (idx < n)
    return torch.where(valid, idx, torch.zeros_like(idx)), valid
