"""A GPT-style decoder (pre-norm, rotary positions, tied embeddings) around any attention variant.

Plain torch: no Lightning, no Hydra. The attention variant is supplied by a factory so
each layer gets its own module (and, with cache=local, its own pattern cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dilexp.attention.base import Attention
from dilexp.patterns.documents import DocumentLayout


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (N, 1, D/2) for (N,) positions, (B, N, 1, D/2) for per-row (B, N) ones."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of a (B, N, H, D) tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class SelfAttention(nn.Module):
    """Projections + rotary + a variant: the multi-head module every variant trains through."""

    def __init__(self, cfg: GPTConfig, attention: Attention) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.attention = attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                docs: DocumentLayout | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_head, self.head_dim).unbind(dim=2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = self.attention(q, k, v, causal=True, docs=docs)
        return self.proj(y.reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, attention: Attention) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, attention)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                docs: DocumentLayout | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cos, sin, docs))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, make_attention: Callable[[], Attention]) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, make_attention()) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied embeddings
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def attention_modules(self) -> list[Attention]:
        return [blk.attn.attention for blk in self.blocks]

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                docs: DocumentLayout | None = None) -> torch.Tensor:
        """idx: (B, N) token ids -> logits (B, N, vocab). ``positions``: global positions of
        the N tokens (a context-parallel shard is not at 0..N-1), (N,) or per row (B, N).
        ``docs``: packed documents; every layer gets the same layout (one build per step, its
        plans cached under its key) and, unless ``positions`` is given, rotary positions
        restart at each document start, as for a document alone."""
        if positions is None:
            if docs is not None and not docs.trivial:
                positions = docs.positions(idx.device)
            else:
                positions = torch.arange(idx.shape[1], device=idx.device)
        cos, sin = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_base)
        x = self.tok_emb(idx)
        for blk in self.blocks:
            x = blk(x, cos, sin, docs)
        return self.lm_head(self.ln_f(x))

