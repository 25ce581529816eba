"""``flex``: the dilated pattern through ``torch.nn.attention.flex_attention``.

Layout. A mask_mod of the dilated pattern on the natural token order makes every visited
block partial: inside a segment a (w, r, o) head keeps one query in r and one key in r, so
each block pair does r^2 times the useful work and evaluates the mask on every entry.
Instead, each head's tokens are permuted so that the positions its (segment, offset) class
selects are contiguous ("compact" order: segment 0's selected positions, then segment 1's,
...). In that order the pattern is plain block-diagonal attention over runs of
L = |selected positions of a segment| tokens: blocks are full (or partial only where a run
boundary cuts a block), the kernel skips everything off the diagonal, and the work is the
useful work. Heads of different branches get different permutations, so the flex call is
over "virtual heads" with one BlockMask row per virtual head: one compiled kernel, one call.

heads="all": each head is every (w_i, r_i) pair, so it becomes m virtual heads in compact
order whose outputs are merged by their log-sum-exps ("lse" mode). Compiled flex on CPU
cannot return the lse (torch 2.13), so there the union is computed in one call over the
natural order with a score_mod adding log(multiplicity) ("natural" mode): exact, but every
block on the largest segment's diagonal is visited, nearly all of them partial, so it is
slow (N = 4096, H = 8, segments [1024, 2048, 4096], rates [1, 2, 4]: about 2.5x slower than
sdpa on CPU) and warns once. Measured for one (2048, 4) pair at N = 4096: the natural order
visits 16x the useful entries and runs about 8x slower than the compact order.

BlockMasks are built from closed-form block tables (``BlockMask.from_kv_blocks``), not by
evaluating the mask_mod on all N x N entries (``create_block_mask`` takes seconds and GBs at
N = 4096), and are held in the pattern cache inside a ``FlexPlan``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from dilexp.attention.base import Capabilities, DilatedAttentionBase
from dilexp.attention.registry import register
from dilexp.cache.base import PatternCache
from dilexp.errors import ConfigError
from dilexp.memory.base import MemoryPool
from dilexp.patterns.documents import DocumentLayout
from dilexp.patterns.flex_documents import DocumentFlexPlan, build_document_flex_plan, document_flex_key
from dilexp.patterns.flex_plan import FlexPlan, build_flex_plan, flex_key

MODES = ("compact", "lse", "natural")


@functools.lru_cache(maxsize=1)
def compiled_flex() -> Callable[..., object]:
    """One compiled flex_attention per process, so every module shares its compiled kernels."""
    # dynamic=False: on CPU the dynamic-shape recompile for a second N emits invalid C++ (torch 2.13).
    return torch.compile(flex_attention, dynamic=False)


def no_cpu_backward_message() -> str:
    return (
        f"flex attention has no backward on CPU in torch {torch.__version__}; "
        "use attention=improved for training on CPU, or run on CUDA"
    )


@register("flex")
class FlexDilatedAttention(DilatedAttentionBase):
    """The LongNet dilated pattern (DESIGN section 3) through FlexAttention."""

    # "compiled" is what runs; "eager" is torch's uncompiled flex_attention on the same plan
    # (same BlockMask, permutation and merge), which lets the conformance suite draw many
    # shapes without a ~20 s compile each. Compiled flex is checked on fixed shapes.
    # Pool: the compact-order gathers of q, k, v, when no autograd graph is recorded.
    capabilities = Capabilities(
        pattern="dilated", head_layouts=("grouped", "all"), no_backward_on=("cpu",),
        paths=("compiled", "eager"), slow_paths=("compiled",), settings={"block_size": (16, 32)}, pool=True,
    )

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        segment_lengths: Sequence[int] = (64, 128, 256),
        dilation_rates: Sequence[int] = (1, 2, 4),
        offsets: str = "head",
        heads: str = "grouped",
        cache: PatternCache | None = None,
        pool: MemoryPool | None = None,
        block_size: int = 64,
    ) -> None:
        super().__init__(num_heads, head_dim, segment_lengths, dilation_rates, offsets, heads, cache=cache, pool=pool)
        # The flex kernels tile a BlockMask block by multiples of 16 rows.
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size % 16:
            raise ConfigError("attention.block_size", block_size, "must be a positive multiple of 16")
        self.block_size = block_size
        # Test seams: another flex callable (e.g. eager flex_attention, which returns the lse
        # on CPU), and forcing the lse merge for heads="all" where it would not be chosen.
        self._kernel: Callable[..., object] | None = None
        self._lse_merge: bool | None = None

    def use_path(self, path: str) -> None:
        super().use_path(path)
        self._kernel = flex_attention if path == "eager" else None

    def mode(self, device: torch.device | str) -> str:
        """Which layout a call on ``device`` uses: "compact", "lse" or "natural" (see module doc)."""
        if self.pattern.heads == "grouped":
            return "compact"
        use_lse = self._lse_merge if self._lse_merge is not None else torch.device(device).type == "cuda"
        return "lse" if use_lse else "natural"

    def plan(self, n: int, causal: bool, device: torch.device | str) -> FlexPlan:
        """The cached FlexPlan (BlockMask and permutation) for length ``n`` on ``device``."""
        p, mode = self.pattern, self.mode(device)
        key = flex_key(p, self.num_heads, n, self.block_size, mode, causal)
        if mode == "natural":
            # Python shows this once per process: it explains a slow run, it is not an error.
            warnings.warn(
                f"flex heads='all' on {torch.device(device).type}: compiled flex cannot return the "
                f"log-sum-exp here (torch {torch.__version__}), so the pairs run in natural token order "
                "with partial blocks; exact but slow. Use attention=improved for speed.",
                stacklevel=2,
            )
        dev = torch.device(device)
        return self.lookup(key, lambda: build_flex_plan(p, self.num_heads, n, self.block_size, mode, causal, dev),
                           device)

    def prepare(self, n: int, device: torch.device | str, causal: bool | None = None) -> None:
        for c in (False, True) if causal is None else (causal,):
            self.plan(n, c, device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        self._check_input(q, k, v)
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise NotImplementedError(no_cpu_backward_message())
        b, n, h, d = q.shape
        plan = self.plan(n, causal, q.device)
        kernel = self._kernel if self._kernel is not None else compiled_flex()
        scale = 1.0 / math.sqrt(d)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views

        if plan.kind == "natural":
            return self._natural(kernel, qt, kt, vt, plan, scale, n)

        # Compact order: slot s of virtual head j holds token perm[j, s] of head heads[j].
        tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        scratch: list[torch.Tensor] | None = None if tracked else []
        qv, kv, vv = (self._compact(t, plan, scratch) for t in (q, k, v))
        o, lse = self._virtual_heads(kernel, qv, kv, vv, plan, scale)
        for buf in scratch or ():
            self.pool.release(buf)  # the kernel is done with them, and no graph saved them
        return self._merge(o, lse, plan.inv[None], plan.sel[None], plan.kind, h)

    @staticmethod
    def _natural(kernel: Any, qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, plan: Any, scale: float,
                 n: int) -> torch.Tensor:
        """Natural token order: the block mask's padded length, the score_mod does the pattern."""
        npad = plan.block_mask.seq_lengths[0]
        if npad != n:
            qt, kt, vt = (F.pad(t, (0, 0, 0, npad - n)) for t in (qt, kt, vt))
        out = kernel(qt, kt, vt, score_mod=plan.score_mod, block_mask=plan.block_mask, scale=scale)
        return out[:, :, :n].transpose(1, 2)

    @staticmethod
    def _virtual_heads(kernel: Any, qv: torch.Tensor, kv: torch.Tensor, vv: torch.Tensor, plan: Any,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One flex call over the virtual heads in compact order; the lse where branches merge."""
        if plan.kind == "lse":
            o, aux = kernel(qv, kv, vv, block_mask=plan.block_mask, scale=scale, return_aux=AuxRequest(lse=True))
            return o, aux.lse
        return kernel(qv, kv, vv, block_mask=plan.block_mask, scale=scale), None

    def _merge(self, o: torch.Tensor, lse: torch.Tensor | None, inv: torch.Tensor, sel: torch.Tensor, kind: str,
               h: int) -> torch.Tensor:
        """Compact slots back to tokens (inv, sel: (1 or B, V, N)), then the branches merged by lse."""
        b, nv, _, d = o.shape
        n = inv.shape[-1]
        back = inv[:, :, :, None].expand(b, nv, n, d)
        # Tokens a virtual head does not select read some slot; `sel` zeroes them exactly.
        o = torch.where(sel[:, :, :, None], o.gather(2, back), 0.0)
        if kind == "compact":
            return o.transpose(1, 2)
        m = self.pattern.num_pairs
        # A finite floor for "not selected": -inf would give nan gradients in the softmax.
        floor = torch.finfo(torch.float32).min / 4
        lse = torch.where(sel, lse.float().gather(2, back[..., 0]), floor)
        weights = torch.softmax(lse.view(b, m, h, n), dim=1).to(o.dtype)
        return (weights.unsqueeze(-1) * o.view(b, m, h, n, d)).sum(dim=1).transpose(1, 2)

    def document_plan(self, docs: DocumentLayout, causal: bool, device: torch.device | str) -> DocumentFlexPlan:
        """The cached per-layout plan: one BlockMask with a row per batch row (patterns/flex_documents)."""
        p, mode, dev = self.pattern, self.mode(device), torch.device(device)
        key = document_flex_key(p, self.num_heads, docs, self.block_size, mode, causal)
        return self.lookup(key, lambda: build_document_flex_plan(p, self.num_heads, docs, self.block_size, mode,
                                                                 causal, dev), device)

    def forward_documents(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, docs: DocumentLayout
    ) -> torch.Tensor:
        """Packed documents in one flex call: the forward above with per-row tables, the
        document mask folded into the segment ids (segments are numbered across documents)."""
        self._check_input(q, k, v)
        self._check_layout(q, docs)
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise NotImplementedError(no_cpu_backward_message())
        b, n, h, d = q.shape
        plan = self.document_plan(docs, causal, q.device)
        kernel = self._kernel if self._kernel is not None else compiled_flex()
        scale = 1.0 / math.sqrt(d)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        if plan.kind == "natural":
            return self._natural(kernel, qt, kt, vt, plan, scale, n)

        # Slot s of virtual head j in row i holds token perm[i, j, s] of head heads[j].
        rows = torch.arange(b, device=q.device)[:, None, None]
        idx = (rows, plan.heads[None, :, None], plan.perm)
        o, lse = self._virtual_heads(kernel, qt[idx], kt[idx], vt[idx], plan, scale)
        return self._merge(o, lse, plan.inv, plan.sel, plan.kind, h)

    def _compact(self, x: torch.Tensor, plan: FlexPlan, scratch: list[torch.Tensor] | None) -> torch.Tensor:
        """(B, N, H, D) -> (B, V, Np, D): each virtual head's tokens in compact order.

        Without autograd (``scratch`` given) and on a contiguous input this is one
        ``index_select`` into a buffer from the pool; otherwise autograd's indexing owns it.
        """
        if scratch is None or not x.is_contiguous():
            return x.transpose(1, 2)[(slice(None), plan.heads[:, None], plan.perm)]
        b, n, h, d = x.shape
        nv, npad = plan.perm.shape
        flat = (plan.perm * h + plan.heads[:, None]).reshape(-1)  # token-major index of (token, head)
        buf = self.pool.empty((b, nv * npad, d), x.dtype, x.device)
        torch.index_select(x.view(b, n * h, d), 1, flat, out=buf)
        scratch.append(buf)
        return buf.view(b, nv, npad, d)

    def extra_repr(self) -> str:
        p = self.pattern
        return (
            f"{super().extra_repr()}, segment_lengths={list(p.segment_lengths)}, "
            f"dilation_rates={list(p.dilation_rates)}, offsets={p.offsets}, heads={p.heads}, "
            f"block_size={self.block_size}"
        )
