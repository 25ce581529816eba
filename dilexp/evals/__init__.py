"""Quality evals: accuracy by key->query distance, loss by position, passkey retrieval."""

from dilexp.evals.binning import BinnedTotals, bin_label, pow2_bin

__all__ = ["BinnedTotals", "bin_label", "pow2_bin"]
