"""What every attention variant is: a module ``attn(q, k, v, causal=bool)`` on (B, N, H, D) tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dilexp.cache.base import PatternCache
from dilexp.errors import ConfigError
from dilexp.memory.base import MemoryPool, NoPool


class Attention(nn.Module):
    """Base class of the variants.

    Subclasses implement ``forward(q, k, v, causal)`` and either keep their pattern in
    ``self.pattern`` or override ``dense_multiplicity(n)``: the (H, N, N) integer tensor
    of how often each key is selected for each query (0 = masked), before the causal mask.
    It is the oracle for tests and the FLOP counter for benchmarks; it is never used on
    the hot path.
    """

    name: str = "base"
    # DilatedPattern or BlockSparsePattern, set by the variants that have one.
    pattern: Any = None

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        cache: PatternCache | None = None,
        pool: MemoryPool | None = None,
    ) -> None:
        super().__init__()
        if int(num_heads) < 1:
            raise ConfigError("model.n_head", num_heads, "must be >= 1")
        if int(head_dim) < 1:
            raise ConfigError("model.head_dim", head_dim, "must be >= 1")
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        if cache is None:
            from dilexp.cache import build_cache

            cache = build_cache("local")
        self.cache = cache
        self.pool = pool if pool is not None else NoPool()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, n: int, device: torch.device | str, causal: bool | None = None) -> None:
        """Build, through the cache, every pattern a length-``n`` call on ``device`` needs.

        ``causal``: the mask the calls will use; None builds both (a caller that will use
        both, or does not know). Used for pregeneration (cache=gpu) so the first step is
        already a hit. Variants with patterns override it; the default has nothing to build.
        """
        return None

    def dense_multiplicity(self, n: int) -> torch.Tensor:
        """(H, N, N) int tensor: times each key is selected for each query (no causal mask).

        The pattern's own (patterns/), for variants that keep one in ``self.pattern``.
        """
        if self.pattern is None:
            raise NotImplementedError(f"{type(self).__name__}: no pattern, so dense_multiplicity must be overridden")
        return self.pattern.dense_multiplicity(n, self.num_heads)

    def allowed_pairs(self, n: int, causal: bool) -> int:
        """Query-key pairs the pattern computes (with multiplicity): the useful-FLOP count.

        Variants holding a ``DilatedPattern`` as ``self.pattern`` are counted in closed
        form (any N); others fall back to the dense mask (small N only).
        """
        from dilexp.patterns.dilated import DilatedPattern, allowed_pairs

        pattern = getattr(self, "pattern", None)
        if isinstance(pattern, DilatedPattern):
            return allowed_pairs(pattern, n, self.num_heads, causal)
        mult = self.dense_multiplicity(n)
        if causal:
            mult = torch.tril(mult)
        return int(mult.sum().item())

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, cache={self.cache.name}"

    def _check_input(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
            raise ValueError(f"{self.name}: q, k, v must share one (B, N, H, D) shape, got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if q.shape[2] != self.num_heads or q.shape[3] != self.head_dim:
            raise ValueError(f"{self.name}: built for H={self.num_heads}, D={self.head_dim}, "
                             f"got H={q.shape[2]}, D={q.shape[3]}")
