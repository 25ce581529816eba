"""Power-of-two bins of a positive integer (a key->query distance, a position in the context).

Bin ``i`` holds the integers ``2**i .. 2**(i+1) - 1`` and is labelled ``"<lo>-<hi>"`` with both ends
included: ``1-1``, ``2-3``, ``4-7``, ``8-15``, ... Totals are kept as sums and counts, not means, so
batches, validation epochs and ranks add up exactly before any division.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Enough for any sequence a float64 index can count exactly (2**48 tokens).
NUM_BINS = 48


def pow2_bin(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) of integers x >= 1, exactly (frexp's exponent, not a rounded log)."""
    if x.numel() and int(x.min()) < 1:
        raise ValueError(f"pow2_bin takes integers >= 1, got {int(x.min())}")
    _, exponent = torch.frexp(x.to(torch.float64))
    return (exponent - 1).to(torch.long)


def bin_label(i: int) -> str:
    return f"{2**i}-{2 ** (i + 1) - 1}"


class BinnedTotals:
    """Sums and counts of a value per power-of-two bin of a key."""

    def __init__(self) -> None:
        self.sums = torch.zeros(NUM_BINS, dtype=torch.float64)
        self.counts = torch.zeros(NUM_BINS, dtype=torch.float64)

    def add(self, values: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> None:
        """Add ``values[mask]`` to the bins of ``keys[mask]`` (same shapes; keys >= 1 where masked)."""
        bins = pow2_bin(keys[mask].detach().cpu())
        self.sums.index_add_(0, bins, values[mask].detach().cpu().to(torch.float64))
        self.counts.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))

    def reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> BinnedTotals:
        """The totals summed by ``reduce_sum`` (e.g. an all-reduce over ranks): one collective call."""
        both = reduce_sum(torch.stack([self.sums, self.counts]))
        out = BinnedTotals()
        out.sums, out.counts = both[0].cpu().to(torch.float64), both[1].cpu().to(torch.float64)
        return out

    def means(self) -> dict[str, float]:
        """``{label: mean}`` of every bin that holds something, in bin order."""
        return {bin_label(i): float(self.sums[i] / self.counts[i]) for i in range(NUM_BINS) if self.counts[i] > 0}

    def totals(self) -> dict[str, int]:
        return {bin_label(i): int(self.counts[i]) for i in range(NUM_BINS) if self.counts[i] > 0}
