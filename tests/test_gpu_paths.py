"""The fused, log-sum-exp-returning paths the GPU takes (issue 17), checked against the dense reference.

The CPU tests run the very code the GPU runs, with the CPU's kernel pair in place of the
CUDA one: ``masked_attention_lse`` (dilated heads="all"), improved's one-node path and the
ring's fused ops all go through ``_kernels.lse_kernel``. The tests marked ``gpu`` need CUDA
(``experiments/gpu/run.sh`` runs them with ``pytest -m gpu``) and skip without it.
"""

from __future__ import annotations

import pytest
import torch

import dilexp.attention._kernels as kernels
from dilexp.attention import build
from dilexp.attention.reference import dense_reference, reference_lse

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
DILATED = {"segment_lengths": [16, 32, 64], "dilation_rates": [1, 2, 4]}


def _qkv(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() for _ in range(3)]


def _reference_grads(q, k, v, mult, causal, w_out, w_lse=None):
    """float64 output, lse and q/k/v gradients of sum(out * w_out) (+ sum(lse * w_lse)) by autograd."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = dense_reference(q64, k64, v64, mult, causal)
    lse = reference_lse(q64, k64, mult, causal)
    loss = (out * w_out.double()).sum()
    if w_lse is not None:
        loss = loss + (lse * w_lse.double()).sum()
    return (out, lse, *torch.autograd.grad(loss, (q64, k64, v64)))


# -- CPU: the shared kernel layer -------------------------------------------------------------


def test_lse_kernel_on_cpu_is_the_flash_pair_and_refuses_other_devices() -> None:
    x = torch.zeros(1, 2, 8, 16)
    assert kernels.lse_kernel(x) is kernels.CPU_FLASH
    assert kernels.lse_kernel(x.bfloat16(), masked=True) is kernels.CPU_FLASH
    assert kernels.lse_kernel(torch.zeros(1, 2, 8, 16, device="meta")) is None
    assert kernels.fused_ok(x) and not kernels.fused_ok(x.to(torch.int32))


def test_kernel_input_copies_only_a_strided_last_dimension() -> None:
    base = torch.randn(2, 8, 6, 16)
    strided_rows = base[:, ::2].transpose(1, 2)  # rows and heads strided: the kernels take it
    assert kernels.kernel_input(strided_rows) is strided_rows
    strided_last = base[..., ::2]
    fixed = kernels.kernel_input(strided_last)
    assert fixed.stride(-1) == 1 and torch.equal(fixed, strided_last)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_attention_lse_matches_the_reference_with_lse_gradients(dtype: torch.dtype) -> None:
    """Output, lse and gradients through both (the widened-head backward) against float64."""
    h, n, d = 2, 24, 16
    q, k, v = _qkv((1, n, h, d), dtype, "cpu")
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(n, n, generator=g) > 0.5
    allowed |= torch.eye(n, dtype=torch.bool)  # no empty row (dilated guarantees it too)
    w_out = torch.randn(1, n, h, d, generator=g, dtype=torch.float64)
    w_lse = torch.randn(1, n, h, generator=g, dtype=torch.float64)
    got = kernels.masked_attention_lse(*(t.transpose(1, 2) for t in (q, k, v)), allowed[None, None], d**-0.5)
    assert got is not None
    out, lse = got[0].transpose(1, 2), got[1].transpose(1, 2)
    loss = (out * w_out.to(dtype)).sum() + (lse * w_lse.to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    mult = allowed.expand(h, n, n).to(torch.int64)
    ref = _reference_grads(q, k, v, mult, False, w_out, w_lse)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref, strict=True):
        assert (a.double() - b).abs().max().item() < tol, name


@pytest.mark.parametrize("variant", ["dilated", "improved"])
@pytest.mark.parametrize("causal", [False, True])
def test_heads_all_merges_through_the_fused_kernel_not_explicit_attention(
    variant: str, causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """heads="all" takes the kernel that returns the lse; explicit O(N*w) attention never runs."""
    import dilexp.attention.dilated as dilated_mod
    import dilexp.attention.improved as improved_mod

    def refuse(*args, **kwargs):
        raise AssertionError("explicit attention ran on a device with a fused kernel")

    monkeypatch.setattr(dilated_mod, "explicit_attention", refuse)
    monkeypatch.setattr(improved_mod, "explicit_attention", refuse)
    n, h, d = 100, 4, 16  # a ragged last segment: the dilated batch is padded and masked
    attn = build(variant, num_heads=h, head_dim=d, heads="all", **DILATED)
    q, k, v = _qkv((2, n, h, d), torch.float32, "cpu", seed=3)
    w_out = torch.randn(2, n, h, d, dtype=torch.float64)
    out = attn(q, k, v, causal=causal)
    grads = torch.autograd.grad((out * w_out.float()).sum(), (q, k, v))
    ref = _reference_grads(q, k, v, attn.dense_multiplicity(n), causal, w_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref[0], *ref[2:]), strict=True):
        assert (a.double() - b).abs().max().item() < 5e-5, name


# -- CUDA -------------------------------------------------------------------------------------

# (variant, extra settings, heads layouts): every variant the GPU script benchmarks.
GPU_VARIANTS = [
    ("dilated", {}, ("grouped", "all")),
    ("improved", {}, ("grouped", "all")),
    ("flex", {}, ("grouped", "all")),
    ("ring_v3", {"chunks": 4}, ("grouped", "all")),
]


def _bf16_errors(attn, n: int, h: int, d: int, causal: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Max errors of the variant in bf16 and of the dense reference computed in bf16, both
    against float64, for the output and the q/k/v gradients."""
    q, k, v = _qkv((1, n, h, d), torch.bfloat16, "cuda", seed=5)
    w_out = torch.randn(1, n, h, d, dtype=torch.float64, device="cuda")
    mult = attn.dense_multiplicity(n).cuda()
    ref = _reference_grads(q, k, v, mult, causal, w_out)
    out = attn(q, k, v, causal=causal)
    grads = torch.autograd.grad((out.float() * w_out.float()).sum(), (q, k, v))
    qb, kb, vb = (t.detach().requires_grad_() for t in (q, k, v))
    dense = dense_reference(qb, kb, vb, mult, causal, compute_dtype=torch.bfloat16)
    dense_grads = torch.autograd.grad((dense.float() * w_out.float()).sum(), (qb, kb, vb))
    names = ("out", "dq", "dk", "dv")
    ref_vals = (ref[0], *ref[2:])
    err = lambda xs: {nm: (a.double() - b).abs().max().item() for nm, a, b in zip(names, xs, ref_vals, strict=True)}
    return err((out, *grads)), err((dense, *dense_grads))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant,extra,layouts", GPU_VARIANTS, ids=[v[0] for v in GPU_VARIANTS])
def test_bf16_error_within_twice_dense_bf16(variant: str, extra: dict, layouts: tuple[str, ...]) -> None:
    n, h, d = 512, 8, 64
    for heads in layouts:
        attn = build(variant, num_heads=h, head_dim=d, heads=heads, **DILATED, **extra)
        got, dense = _bf16_errors(attn, n, h, d, causal=True)
        for name in got:
            # A small absolute floor: dense bf16 can be near-exact on a few outputs.
            assert got[name] <= 2 * dense[name] + 1e-3, (variant, heads, name, got[name], dense[name])


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernel_choice() -> None:
    x = torch.zeros(1, 2, 8, 64, device="cuda")
    assert kernels.lse_kernel(x.bfloat16()) is kernels.CUDA_FLASH
    assert kernels.lse_kernel(x.half()) is kernels.CUDA_FLASH
    assert kernels.lse_kernel(x) is kernels.CUDA_EFFICIENT
    assert kernels.lse_kernel(x.bfloat16(), masked=True) is kernels.CUDA_EFFICIENT
    assert kernels.lse_kernel(x.double()) is None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_kernel_pairs_on_strided_views_match_the_reference(dtype: torch.dtype) -> None:
    """Forward lse and the backward fed the forward's out/lse, on views with strided rows."""
    n, h, d = 256, 4, 64
    base = _qkv((1, 2 * n, h, d), dtype, "cuda", seed=7)
    q, k, v = (t.detach()[:, ::2].transpose(1, 2) for t in base)  # rows stride 2: no copy
    kernel = kernels.lse_kernel(q)
    assert kernel is not None and q.stride(-1) == 1
    out, lse = kernel.forward(q, k, v, True, d**-0.5)
    grad = torch.randn_like(out)
    dq, dk, dv = kernel.backward(grad, q, k, v, out, lse, True, d**-0.5)
    qs, ks, vs = (t.transpose(1, 2).double().requires_grad_() for t in (q, k, v))
    mult = torch.ones(h, n, n, dtype=torch.int64, device="cuda")
    ref = dense_reference(qs, ks, vs, mult, causal=True)
    rg = torch.autograd.grad((ref * grad.transpose(1, 2).double()).sum(), (qs, ks, vs))
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
    assert (out.transpose(1, 2).double() - ref).abs().max().item() < tol
    assert (lse.transpose(1, 2).double() - reference_lse(qs, ks, mult, True)).abs().max().item() < tol
    for a, b in zip((dq, dk, dv), rg, strict=True):
        assert (a.transpose(1, 2).double() - b).abs().max().item() < 4 * tol


@pytest.mark.gpu
@needs_cuda
def test_heads_all_on_cuda_never_runs_explicit_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    import dilexp.attention.dilated as dilated_mod
    import dilexp.attention.improved as improved_mod

    def refuse(*args, **kwargs):
        raise AssertionError("explicit attention ran on CUDA")

    monkeypatch.setattr(dilated_mod, "explicit_attention", refuse)
    monkeypatch.setattr(improved_mod, "explicit_attention", refuse)
    for variant in ("dilated", "improved"):
        attn = build(variant, num_heads=8, head_dim=64, heads="all", **DILATED)
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = _qkv((1, 200, 8, 64), dtype, "cuda")
            attn(q, k, v, causal=True).float().sum().backward()
    flex = build("flex", num_heads=8, head_dim=64, heads="all", **DILATED)
    assert flex.mode("cuda") == "lse"


@pytest.mark.gpu
@needs_cuda
def test_flex_compiles_once_per_shape_and_has_a_backward() -> None:
    # The accuracy test's shape: the compiled kernels are reused, no second compile.
    attn = build("flex", num_heads=8, head_dim=64, **DILATED)
    q, k, v = _qkv((1, 512, 8, 64), torch.bfloat16, "cuda")
    attn(q, k, v, causal=True).float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    before = attn.cache.stats()
    attn(q, k, v, causal=True)
    after = attn.cache.stats()
    assert after.get("misses", 0) == before.get("misses", 0)  # the BlockMask came from the cache


@pytest.mark.gpu
@needs_cuda
def test_cuda_events_time_device_work() -> None:
    from dilexp.bench.timing import time_call

    x = torch.randn(2048, 2048, device="cuda")
    t = time_call(lambda: x @ x, torch.device("cuda"))
    assert 0 < t < 1.0
