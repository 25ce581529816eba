"""What every attention variant is: a module ``attn(q, k, v, causal=bool, docs=layout)`` on (B, N, H, D) tensors."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dilexp.attention._kernels import build_pattern, check_dims
from dilexp.cache.base import PatternCache
from dilexp.errors import ConfigError
from dilexp.memory.base import MemoryPool, NoPool
from dilexp.patterns.documents import DocumentLayout, as_layout, group_plan

PATTERN_KINDS = ("full", "dilated", "block_sparse")


@dataclass(frozen=True)
class Capabilities:
    """What a variant declares it can do; the conformance suite (tests/test_conformance.py)
    tests every declared capability and checks that every undeclared one is refused with a
    clear error, so nothing is ever silently degraded.

    - ``pattern``: which settings describe its pattern and so which oracle applies:
      "full" (no pattern settings), "dilated" (segment_lengths, dilation_rates, offsets,
      heads; DESIGN section 3) or "block_sparse" (block_size, local_blocks, ...).
    - ``head_layouts``: the ``heads=`` layouts of a dilated variant ("grouped", "all");
      empty for variants without the setting (``heads="all"`` is then an unknown setting).
    - ``no_backward_on``: device types where it has no backward (e.g. flex on "cpu"); a
      call that needs gradients there raises NotImplementedError before any work.
    - ``process_groups``: shards the sequence over a torch.distributed group (hardware=cp).
      A variant without it refuses to run while a context-parallel group is registered.
    - ``lse``: ``forward_lse`` returns the log-sum-exp of each query row.
    - ``documents``: ``forward(..., docs=layout)`` computes each packed document as its own
      sequence (patterns/documents.py). Every variant has it through the base class's
      generic exact path (``Attention.forward_documents``); a variant overrides that with a
      fast path, or declares False and is refused a layout.
    - ``paths``: its implementations of the same function (e.g. a fused CPU kernel and a
      portable one), selected with ``use_path``; ``slow_paths`` those too slow for the
      quick tests (compilation), checked on one fixed shape instead.
    - ``settings``: values of its own extra settings the suite draws (e.g. ring chunks).
    - ``pool``: takes its scratch buffers from the ``pool=`` it is given. A variant without
      it has none to take, and is refused a pool other than ``memory=none`` (``Attention``).
    """

    pattern: str = "full"
    head_layouts: tuple[str, ...] = ()
    no_backward_on: tuple[str, ...] = ()
    process_groups: bool = False
    lse: bool = False
    documents: bool = True
    paths: tuple[str, ...] = ("default",)
    slow_paths: tuple[str, ...] = ()
    settings: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    pool: bool = False

    def backward_on(self, device: torch.device | str) -> bool:
        return torch.device(device).type not in self.no_backward_on


class Attention(nn.Module):
    """Base class of the variants.

    Subclasses implement ``forward(q, k, v, causal)`` and either keep their pattern in
    ``self.pattern`` or override ``dense_multiplicity(n)``: the (H, N, N) integer tensor
    of how often each key is selected for each query (0 = masked), before the causal mask.
    It is the oracle for tests and the FLOP counter for benchmarks; it is never used on
    the hot path.

    Packed documents: every subclass's ``forward`` also takes ``docs=`` (a
    ``DocumentLayout``). A subclass whose own ``forward`` has no ``docs`` parameter gets it
    added here (``__init_subclass__``): a non-trivial layout goes to ``forward_documents``,
    None or one document per row goes to the subclass's forward unchanged. A subclass that
    declares ``docs`` itself handles it (and may still call ``forward_documents``).
    """

    name: str = "base"
    # DilatedPattern or BlockSparsePattern, set by the variants that have one.
    pattern: Any = None
    capabilities: Capabilities = Capabilities()
    # The cache strategy of a module built without one (Hydra runs always pass one).
    default_cache: str = "local"

    def __init__(self, num_heads: int, head_dim: int, cache: PatternCache | None = None,
                 pool: MemoryPool | None = None) -> None:
        super().__init__()
        check_dims(num_heads, head_dim)
        if pool is not None and not isinstance(pool, NoPool) and not self.capabilities.pool:
            # A pool it never asks would look like a measured setting and change nothing.
            raise ConfigError("memory.kind", pool.name, f"attention={self.name} has no scratch buffers to take "
                              "from a pool; use memory=none")
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        if cache is None:
            from dilexp.cache import build_cache

            cache = build_cache(self.default_cache)
        self.cache = cache
        self.pool = pool if pool is not None else NoPool()
        self._ahead: set[tuple[Any, torch.device | str]] = set()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("forward")
        if own is not None and "docs" not in inspect.signature(own).parameters:
            cls.forward = _with_documents(own)  # type: ignore[method-assign]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                docs: DocumentLayout | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward_documents(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, docs: DocumentLayout
    ) -> torch.Tensor:
        """The generic exact path: every document through the variant as a sequence of its own.

        Exact by construction (the document *is* a sequence of its length). Documents of one
        length, in any rows, go through together as one batch (``group_plan``, cached under the
        layout's key), so the variant is called once per distinct length; variants with a
        per-layout plan override this with a fast path.
        """
        self._check_layout(q, docs)
        b, n, h, d = q.shape
        groups, inverse = self.lookup(("doc_groups", docs.key), lambda: group_plan(docs), q.device)
        qf, kf, vf = (t.reshape(b * n, h, d) for t in (q, k, v))
        outs = [self.forward(qf[idx], kf[idx], vf[idx], causal=causal).reshape(-1, h, d) for _, idx in groups]
        return torch.cat(outs)[inverse].view(b, n, h, d)

    def lookup(self, key: Hashable, build: Callable[[], Any], device: torch.device | str) -> Any:
        """The one cache lookup of a call: its whole plan, under its own key (patterns/).

        Pre-generation is decided here and only here, by the cache's ``pregenerate``
        setting (``cache=gpu``): such a cache gets every plan built ahead of its first use,
        inside ``pregenerating()``, so hit/miss counts measure the steady state.
        """
        cache = self.cache
        if cache.pregenerate and (key, device) not in self._ahead:
            with cache.pregenerating():
                cache.get_or_build(key, build, device)
            self._ahead.add((key, device))
        return cache.get_or_build(key, build, device)

    def prepare(self, n: int, device: torch.device | str, causal: bool | None = None) -> None:
        """Build, through the cache, every pattern a length-``n`` call on ``device`` needs.

        ``causal``: the mask the calls will use; None builds both (a caller that will use
        both, or does not know). Used for pregeneration (cache=gpu) so the first step is
        already a hit. Variants with patterns override it; the default has nothing to build.
        """
        return None

    def use_path(self, path: str) -> None:
        """Select one of ``capabilities.paths`` (the first is the default)."""
        if path not in self.capabilities.paths:
            raise ValueError(f"{self.name}: no path {path!r}; it has {list(self.capabilities.paths)}")

    def forward_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, log-sum-exp (B, N, H) in fp32 or fp64) without autograd; -inf where a row
        has no allowed key. Only variants declaring ``capabilities.lse`` have it."""
        raise NotImplementedError(f"{self.name} does not expose its log-sum-exp (capabilities.lse is False)")

    def dense_multiplicity_rows(self, n: int, head: int, start: int, stop: int) -> torch.Tensor:
        """(stop - start, N) int64: rows [start, stop) of ``dense_multiplicity(n)[head]``.

        The row-block form lets a float64 reference run at N where the (H, N, N) mask
        would not fit (task=check); variants with a pattern answer without building it.
        """
        pattern = self.pattern
        if pattern is not None and hasattr(pattern, "multiplicity_rows"):
            return pattern.multiplicity_rows(n, self.num_heads, head, start, stop)
        return self.dense_multiplicity(n)[head, start:stop]

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

    def _check_layout(self, q: torch.Tensor, docs: DocumentLayout) -> None:
        """A layout must describe this batch; slicing a context-parallel shard per document
        would attend within the shard only, so the generic path refuses one."""
        if not self.capabilities.documents:
            raise NotImplementedError(f"{self.name} does not take packed documents (capabilities.documents is False)")
        _refuse_under_context_parallel(f"{self.name} (generic document path)")
        if docs.n != q.shape[1] or docs.batch != q.shape[0]:
            raise ValueError(f"{self.name}: layout is for B={docs.batch}, N={docs.n}, got q of shape {tuple(q.shape)}")

    def _check_input(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.capabilities.process_groups:
            _refuse_under_context_parallel(self.name)
        if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
            raise ValueError(f"{self.name}: q, k, v must share one (B, N, H, D) shape, got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if q.shape[2] != self.num_heads or q.shape[3] != self.head_dim:
            raise ValueError(f"{self.name}: built for H={self.num_heads}, D={self.head_dim}, "
                             f"got H={q.shape[2]}, D={q.shape[3]}")


def _with_documents(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``forward`` with the ``docs=`` keyword: a real layout goes to ``forward_documents``."""

    @functools.wraps(forward)
    def wrapped(self: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                docs: DocumentLayout | None = None) -> torch.Tensor:
        layout = as_layout(docs)
        if layout is None:
            return forward(self, q, k, v, causal=causal)
        return self.forward_documents(q, k, v, causal, layout)

    wrapped.__signature__ = inspect.signature(wrapped, follow_wrapped=False)  # type: ignore[attr-defined]
    return wrapped


def _refuse_under_context_parallel(name: str) -> None:
    """A variant that cannot shard the sequence must not see a shard: it would attend
    within the shard only and return a plausible, wrong result."""
    from dilexp.distributed import context_parallel_group, group_rank_world

    _, world = group_rank_world(context_parallel_group())
    if world > 1:
        raise RuntimeError(f"{name}: a context-parallel group of {world} ranks is registered, but {name} cannot "
                           "shard the sequence over process groups; use a variant that declares "
                           "capabilities.process_groups (ring_v2, ring_v3)")


class DilatedAttentionBase(Attention):
    """What every variant of the dilated pattern (DESIGN section 3) is built from: its
    validated ``DilatedPattern`` and the softmax scale."""

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
        self.branches = tuple(pattern.branches(num_heads))
        self.scale = 1.0 / math.sqrt(head_dim)
