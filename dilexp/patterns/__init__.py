"""Sparsity patterns: what each variant computes, as index tensors and as dense masks."""

from dilexp.patterns.block_sparse import BlockSparsePattern
from dilexp.patterns.dilated import Branch, DilatedPattern, allowed_pairs, segment_positions
from dilexp.patterns.documents import DocumentLayout

__all__ = ["Branch", "DilatedPattern", "allowed_pairs", "segment_positions"]
__all__ += ["BlockSparsePattern"]
__all__ += ["DocumentLayout"]
