"""The space the conformance suite draws from, and the one check every case goes through.

A case is everything needed to build a variant and to know, independently of the module,
what it must compute: the oracle's multiplicity comes from ``dilexp.patterns`` applied to
the *settings*, never from the module under test (a module that misreports its own pattern
would otherwise pass).

Cases are drawn through a small ``Draw`` interface so one definition of the space serves
Hypothesis (``HypothesisDraw``, in-process tests) and a seeded ``random.Random``
(``RandomDraw``, cases shipped to spawned process groups, where Hypothesis cannot drive).
Which settings a variant takes follows from its declared ``capabilities``: the pattern kind,
the head layouts, its own extra settings and its code paths.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from dilexp.attention import Attention, build, capabilities
from dilexp.attention.reference import dense_reference, reference_lse
from dilexp.cache import build_cache
from dilexp.memory.base import MemoryPool
from dilexp.patterns.block_sparse import BlockSparsePattern
from dilexp.patterns.dilated import DilatedPattern

T = TypeVar("T")

# DESIGN section 3: max abs error against the float64 reference, forward and gradients.
# fp64 is not in DESIGN; 1e-8 leaves room for fp32 constants inside kernels (flex's
# log-multiplicity score_mod) while still telling an fp64 path from an fp32 one.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float64: 1e-8}


class Draw:
    def int(self, lo: int, hi: int) -> int:  # inclusive bounds
        raise NotImplementedError

    def choice(self, options: Sequence[T]) -> T:
        raise NotImplementedError


class HypothesisDraw(Draw):
    def __init__(self, draw: Callable[[Any], Any]) -> None:
        self._draw = draw

    def int(self, lo: int, hi: int) -> int:
        from hypothesis import strategies as st

        return self._draw(st.integers(lo, hi))

    def choice(self, options: Sequence[T]) -> T:
        from hypothesis import strategies as st

        return self._draw(st.sampled_from(list(options)))


class RandomDraw(Draw):
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return self._rng.choice(list(options))


@dataclass
class Case:
    """One variant at one shape and one set of settings."""

    variant: str
    settings: dict[str, Any]  # pattern settings + the variant's own (passed to build)
    num_heads: int
    head_dim: int
    n: int
    b: int = 1
    causal: bool = False
    path: str | None = None
    layout: str = "bnhd"  # "qkv": q, k, v strided slices of one fused projection
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, cache: str = "local", pool: MemoryPool | None = None, **more: Any) -> Attention:
        attn = build(self.variant, num_heads=self.num_heads, head_dim=self.head_dim, cache=build_cache(cache),
                     pool=pool, **self.settings, **more)
        if self.path is not None:
            attn.use_path(self.path)
        return attn

    def oracle(self) -> torch.Tensor:
        """(H, N, N) multiplicity from the settings alone (DESIGN section 3 / patterns/)."""
        return oracle_multiplicity(capabilities(self.variant).pattern, self.settings, self.n, self.num_heads)


PATTERN_KEYS = {
    "full": (),
    "dilated": ("segment_lengths", "dilation_rates", "offsets", "heads"),
    "block_sparse": ("block_size", "local_blocks", "dilation", "global_blocks", "sparsity"),
}


def oracle_multiplicity(kind: str, settings: dict[str, Any], n: int, h: int) -> torch.Tensor:
    pattern_settings = {k: v for k, v in settings.items() if k in PATTERN_KEYS[kind]}
    if kind == "full":
        return torch.ones(h, n, n, dtype=torch.int64)
    if kind == "dilated":
        return DilatedPattern.from_config(**pattern_settings).dense_multiplicity(n, h)
    if kind == "block_sparse":
        return BlockSparsePattern.from_config(**pattern_settings).dense_multiplicity(n, h)
    raise AssertionError(f"no oracle for pattern kind {kind!r}: add it to tests/conformance/space.py")


def draw_pattern(kind: str, d: Draw, head_layouts: Sequence[str], max_n: int) -> tuple[dict[str, Any], int, int]:
    """(pattern settings, H, N) of one kind. Covers N below the smallest segment, N a
    multiple of no segment, segments >= N, rates above the segment length (offsets that
    select nothing), and H not divisible by the number of pairs."""
    if kind == "full":
        return {}, d.int(1, 5), d.int(1, max_n)
    if kind == "dilated":
        m = d.int(1, 3)
        heads = d.choice(head_layouts)
        settings = {
            "segment_lengths": [d.int(1, 12) for _ in range(m)],
            "dilation_rates": [d.int(1, 5) for _ in range(m)],
            "offsets": d.choice(["head", "group"]),
            "heads": heads,
        }
        return settings, d.int(m if heads == "grouped" else 1, 7), d.int(1, max_n)
    if kind == "block_sparse":
        settings = {
            "block_size": d.choice([1, 3, 8, 16, 64]),
            "local_blocks": d.int(0, 2),
            "dilation": d.int(0, 4),
            "global_blocks": d.int(0, 2),
            "sparsity": d.choice([None, None, 0.3, 0.6]),
        }
        return settings, d.int(1, 5), d.int(1, 3 * max_n)
    raise AssertionError(f"no settings space for pattern kind {kind!r}: add it to tests/conformance/space.py")


def draw_case(variant: str, d: Draw, max_n: int = 24, slow: bool = False, layouts: Sequence[str] = ("bnhd", "qkv"),
              min_n: int = 1) -> Case:
    caps = capabilities(variant)
    settings, h, n = draw_pattern(caps.pattern, d, caps.head_layouts, max_n)
    for key, values in caps.settings.items():
        settings[key] = d.choice(values)
    paths = [p for p in caps.paths if slow or p not in caps.slow_paths]
    return Case(variant, settings, h, d.choice([2, 4, 6, 8, 16]), max(n, min_n), b=d.int(1, 2),
                causal=d.choice([False, True]), path=d.choice(paths), layout=d.choice(layouts), seed=d.int(0, 999))


def inputs(case: Case, dtype: torch.dtype, device: str = "cpu") -> tuple[tuple[torch.Tensor, ...], tuple, torch.Tensor]:
    """((leaves), (q, k, v), grad_out): fresh random inputs of the case (same seed, same values)."""
    gen = torch.Generator().manual_seed(case.seed)
    b, n, h, d = case.b, case.n, case.num_heads, case.head_dim
    if case.layout == "qkv":
        qkv = torch.randn(b, n, 3, h, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        leaves: tuple[torch.Tensor, ...] = (qkv,)
        qkv_t = tuple(qkv.unbind(2))
    else:
        leaves = tuple(torch.randn(b, n, h, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
                       for _ in range(3))
        qkv_t = leaves
    grad_out = torch.randn(b, n, h, d, generator=gen).to(device=device, dtype=dtype)
    return leaves, qkv_t, grad_out


@dataclass
class Errors:
    out: float
    grad: float | None  # None: no backward on this device (forward-only check)
    lse: float | None  # None: the variant does not expose it

    def worst(self) -> float:
        return max(e for e in (self.out, self.grad, self.lse) if e is not None)


def lse_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error over rows with allowed keys; a row empty in one and not the other is inf."""
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), finite) or bool((got[~finite] > 0).any()):
        return float("inf")
    return (got.double()[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0


def errors(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu", attn: Attention | None = None,
           oracle: torch.Tensor | None = None) -> Errors:
    """Max abs errors of the case's module against the float64 dense reference: output,
    q/k/v gradients (where the variant has a backward on ``device``) and lse (where exposed).
    ``oracle``: another multiplicity than the settings' (to show a wrong pattern is caught)."""
    attn = attn if attn is not None else case.build()
    attn = attn.to(device)
    caps = attn.capabilities
    mult = case.oracle() if oracle is None else oracle
    leaves, (q, k, v), grad_out = inputs(case, dtype, device)
    backward = caps.backward_on(device)
    if backward:
        out = attn(q, k, v, causal=case.causal)
        grads = torch.autograd.grad(out, leaves, grad_out)
    else:
        with torch.no_grad():
            out = attn(q, k, v, causal=case.causal)
    assert out.shape == q.shape and out.dtype == dtype, (out.shape, out.dtype)

    leaves64 = tuple(x.detach().double().requires_grad_() for x in leaves)
    q64, k64, v64 = leaves64[0].unbind(2) if case.layout == "qkv" else leaves64
    ref = dense_reference(q64, k64, v64, mult.to(device), case.causal)
    out_err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    grad_err = None
    if backward:
        ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
        grad_err = max((g.double() - r).abs().max().item() if g.numel() else 0.0
                       for g, r in zip(grads, ref_grads, strict=True))
    lse_err = None
    if caps.lse:
        with torch.no_grad():
            out2, lse = attn.forward_lse(q.detach(), k.detach(), v.detach(), causal=case.causal)
        lse_err = lse_error(lse, reference_lse(q64.detach(), k64.detach(), mult.to(device), case.causal))
        # The lse path must compute the same output as the training path.
        out_err = max(out_err, (out2.double() - ref).abs().max().item() if out2.numel() else 0.0)
    return Errors(out_err, grad_err, lse_err)


def assert_conforms(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu", **kw: Any) -> Errors:
    err = errors(case, dtype, device, **kw)
    assert err.worst() <= TOL[dtype], (err, case)
    return err
