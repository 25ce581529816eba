"""``sdpa``: full attention through torch's fused kernel; the baseline (w = N, r = 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dilexp.attention.base import Attention, Capabilities
from dilexp.attention.registry import register


@register("sdpa")
class SDPAttention(Attention):
    """Every query sees every key (every earlier key when causal)."""

    # No pool: the fused kernel allocates its output itself, and there is nothing else.
    capabilities = Capabilities(pattern="full")

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        self._check_input(q, k, v)
        # SDPA wants heads before the sequence; transposes are views, the kernel takes the strides.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
        return out.transpose(1, 2)

    def dense_multiplicity(self, n: int) -> torch.Tensor:
        return torch.ones(self.num_heads, n, n, dtype=torch.int64)

    def dense_multiplicity_rows(self, n: int, head: int, start: int, stop: int) -> torch.Tensor:
        return torch.ones(max(0, min(stop, n) - start), n, dtype=torch.int64)

    def allowed_pairs(self, n: int, causal: bool) -> int:
        # Closed form: the dense mask would be H * N^2 integers (17 GB at N = 16K).
        per_head = n * (n + 1) // 2 if causal else n * n
        return self.num_heads * per_head
