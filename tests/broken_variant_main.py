"""`python -m broken_variant_main ARGS`: `python -m dilexp ARGS` with a deliberately wrong variant,
``broken``, registered first (task=check must fail on it; see test_check_task.py)."""

from __future__ import annotations

import torch

from dilexp.attention import register
from dilexp.attention.sdpa import SDPAttention


@register("broken")
class BrokenAttention(SDPAttention):
    """sdpa that perturbs its output slightly: wrong, but only a check can tell."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        return super().forward(q, k, v, causal) * 1.01


if __name__ == "__main__":
    from dilexp.main import main

    main()
