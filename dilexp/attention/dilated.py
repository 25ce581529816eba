"""``dilated``: the LongNet pattern of DESIGN section 3, computed the straightforward way.

Per branch (one (w, r, offset) and the heads that share it) the selected positions of
every segment are gathered with one index tensor from the pattern cache into a
(B, segments, heads, slots, D) batch and attended in one batched call; the last,
shorter segment is padded and its padding masked. This is the readable baseline that
``improved`` must match and beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dilexp.attention._kernels import (
    build_pattern,
    check_dims,
    explicit_attention,
    heads_index,
    lse_dtype,
    lse_floor,
    masked_attention_lse,
)
from dilexp.attention.base import Attention, Capabilities
from dilexp.attention.registry import register
from dilexp.cache.base import PatternCache
from dilexp.memory.base import MemoryPool
from dilexp.patterns.dilated import Branch, segment_positions


def _segment_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """(S, 1, L, L) bool: which key slot each query slot may see.

    Padding keys are hidden from real queries. Padding *queries* may see every key:
    their outputs are discarded, and a row with no key at all would only invite a
    0/0 (NaN) into the backward pass.
    """
    allowed = valid.unsqueeze(1).expand(-1, valid.shape[1], -1)
    if causal:
        slots = valid.shape[1]
        allowed = allowed & torch.ones(slots, slots, dtype=torch.bool, device=valid.device).tril()
    allowed = allowed | ~valid.unsqueeze(2)
    return allowed.unsqueeze(1).contiguous()


@register("dilated")
class DilatedAttention(Attention):
    """Dilated attention by gather + one batched attention call per branch."""

    capabilities = Capabilities(pattern="dilated", head_layouts=("grouped", "all"))

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        offsets: str = "head",
        heads: str = "grouped",
        cache: PatternCache | None = None,
        pool: MemoryPool | None = None,
    ) -> None:
        check_dims(num_heads, head_dim)
        pattern = build_pattern(num_heads, segment_lengths, dilation_rates, offsets, heads)
        super().__init__(num_heads, head_dim, cache=cache, pool=pool)
        self.pattern = pattern
        self.branches: list[Branch] = pattern.branches(num_heads)
        self.scale = 1.0 / math.sqrt(head_dim)

    # -- patterns (all through the cache) ---------------------------------------------------

    def _positions(self, n: int, b: Branch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("dilated_idx", n, b.segment_length, b.dilation_rate, b.offset)
        return self.cache.get_or_build(
            key, lambda: segment_positions(n, b.segment_length, b.dilation_rate, b.offset), device
        )

    def _scatter(self, n: int, b: Branch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (P,), slots (P,)): where each real slot of the padded batch goes back to."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            idx, valid = segment_positions(n, b.segment_length, b.dilation_rate, b.offset)
            slots = valid.reshape(-1).nonzero().squeeze(1)
            return idx.reshape(-1)[slots], slots

        key = ("dilated_scatter", n, b.segment_length, b.dilation_rate, b.offset)
        return self.cache.get_or_build(key, build, device)

    def _mask(self, n: int, b: Branch, causal: bool, device: torch.device | str) -> torch.Tensor:
        def build() -> torch.Tensor:
            _, valid = segment_positions(n, b.segment_length, b.dilation_rate, b.offset)
            return _segment_mask(valid, causal)

        key = ("dilated_mask", n, b.segment_length, b.dilation_rate, b.offset, causal)
        return self.cache.get_or_build(key, build, device)

    def _heads(self, b: Branch, device: torch.device | str) -> torch.Tensor:
        return self.cache.get_or_build(
            ("dilated_heads", b.heads), lambda: torch.tensor(b.heads, dtype=torch.int64), device
        )

    def prepare(self, n: int, device: torch.device | str, causal: bool | None = None) -> None:
        for b in self.branches:
            self._positions(n, b, device)
            self._scatter(n, b, device)
            self._heads(b, device)
            for c in (False, True) if causal is None else (causal,):
                self._mask(n, b, c, device)

    # -- compute ----------------------------------------------------------------------------

    def _attend_lse(
        self, qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of one branch's (B, S, Hb, L, D) batch: a fused masked kernel that
        returns the log-sum-exp where the device has one (CPU flash, CUDA memory-efficient),
        explicit O(S*L^2) attention only where none takes the inputs (fp64 on CUDA)."""
        bsz, segs = qs.shape[:2]
        # (S, 1, L, L) -> (B*S, 1, L, L): the kernels take one leading batch dimension.
        allowed = mask if bsz == 1 else mask.expand(bsz, *mask.shape).flatten(0, 1)
        fused = masked_attention_lse(qs.flatten(0, 1), ks.flatten(0, 1), vs.flatten(0, 1), allowed, self.scale)
        if fused is None:
            return explicit_attention(qs, ks, vs, mask, causal=False, scale=self.scale)
        o_b, lse_b = fused
        return o_b.unflatten(0, (bsz, segs)), lse_b.unflatten(0, (bsz, segs))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        self._check_input(q, k, v)
        bsz, n, h, d = q.shape
        device = q.device
        merge = self.pattern.heads == "all"
        acc = lse_dtype(q.dtype) if merge else q.dtype
        out = torch.zeros(bsz, n, h, d, dtype=acc, device=device)
        if merge:
            run_lse = torch.full((bsz, n, h), lse_floor(acc), dtype=acc, device=device)

        for b in self.branches:
            idx, valid = self._positions(n, b, device)
            num_seg, slots = idx.shape
            pos, keep = self._scatter(n, b, device)
            mask = self._mask(n, b, causal, device)
            hsel = heads_index(b.heads)
            flat = idx.reshape(-1)

            def gather(x: torch.Tensor, hsel=hsel, flat=flat, num_seg=num_seg, slots=slots) -> torch.Tensor:
                # (B, S*L, Hb, D) -> (B, S, Hb, L, D): segments become a batch dimension.
                picked = x[:, :, hsel].index_select(1, flat)
                return picked.unflatten(1, (num_seg, slots)).permute(0, 1, 3, 2, 4)

            qs, ks, vs = gather(q), gather(k), gather(v)
            if merge:
                o_b, lse_b = self._attend_lse(qs, ks, vs, mask)
            else:
                o_b = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale)
            # Back to (B, S*L, Hb, D), keep the real slots only.
            o_b = o_b.permute(0, 1, 3, 2, 4).reshape(bsz, num_seg * slots, len(b.heads), d)
            o_b = o_b.index_select(1, keep)
            heads_t = self._heads(b, device)
            where = (slice(None), pos.unsqueeze(1), heads_t.unsqueeze(0))
            if not merge:
                out[where] = o_b
                continue
            # Online softmax over the pairs: rescale what is there by the new total.
            lse_b = lse_b.transpose(2, 3).reshape(bsz, num_seg * slots, len(b.heads)).index_select(1, keep)
            old_lse = run_lse[where]
            new_lse = torch.logaddexp(old_lse, lse_b)
            out[where] = (
                out[where] * torch.exp(old_lse - new_lse).unsqueeze(-1)
                + o_b.to(acc) * torch.exp(lse_b - new_lse).unsqueeze(-1)
            )
            run_lse[where] = new_lse
        return out.to(q.dtype)
