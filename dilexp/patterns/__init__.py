"""Sparsity patterns: what each variant computes, and the plans the variants compute from.

``dilated`` / ``block_sparse``: the patterns and their dense masks (the oracle). Plans, each
built from one pattern under its own cache key: ``strided`` (improved's views), ``gather``
(dilated's index tensors), ``ring_layout`` / ``ring_ops`` (the ring), ``flex_plan`` (flex's
BlockMasks).
"""

from dilexp.patterns.block_sparse import BlockSparsePattern
from dilexp.patterns.dilated import Branch, DilatedPattern, allowed_pairs, segment_positions

__all__ = ["Branch", "DilatedPattern", "allowed_pairs", "segment_positions"]
__all__ += ["BlockSparsePattern"]
