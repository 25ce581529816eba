"""``sdpa``: full attention through torch's fused kernel; the baseline (w = N, r = 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dilexp.attention.base import Attention, Capabilities
from dilexp.attention.registry import register
from dilexp.patterns.documents import DocumentLayout, bucket_plan


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

    def forward_documents(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, docs: DocumentLayout
    ) -> torch.Tensor:
        """Block-diagonal (causal) attention: documents padded to size buckets and run as
        batches, one fused call per bucket (``bucket_plan``, cached under the layout's key).

        Exact: a padded slot is never a key of a real query (after it when causal, masked
        otherwise) and its own output is dropped. Unlike one (N, N) block-diagonal mask, the
        work is per document (about a quarter over its pairs at most) and no N x N tensor is held.
        """
        self._check_input(q, k, v)
        self._check_layout(q, docs)
        b, n, h, d = q.shape
        buckets, inverse = self.lookup(("doc_buckets", docs.key), lambda: bucket_plan(docs), q.device)
        qf, kf, vf = (t.reshape(b * n, h, d) for t in (q, k, v))
        outs = []
        for _size, idx, valid, kept, padded in buckets:
            qb, kb, vb = (t[idx].transpose(1, 2) for t in (qf, kf, vf))  # (docs, H, size, D)
            mask = valid[:, None, None, :] if padded and not causal else None
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=causal)
            outs.append(out.transpose(1, 2).reshape(-1, h, d)[kept])
        return torch.cat(outs)[inverse].view(b, n, h, d)

    def dense_multiplicity(self, n: int) -> torch.Tensor:
        return torch.ones(self.num_heads, n, n, dtype=torch.int64)

    def dense_multiplicity_rows(self, n: int, head: int, start: int, stop: int) -> torch.Tensor:
        return torch.ones(max(0, min(stop, n) - start), n, dtype=torch.int64)

    def allowed_pairs(self, n: int, causal: bool) -> int:
        # Closed form: the dense mask would be H * N^2 integers (17 GB at N = 16K).
        per_head = n * (n + 1) // 2 if causal else n * n
        return self.num_heads * per_head
