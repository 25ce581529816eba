"""One conformance suite for every registered attention variant (DESIGN section 3).

Everything here is parametrized over ``dilexp.attention.available()``: a variant added later
gets all of it by registering and declaring its ``capabilities``. What a variant declares
(head layouts, backward on a device, process groups, log-sum-exp, code paths, its own
settings) is tested; what it does not declare must be refused with a clear error.
Process groups are covered in test_conformance_distributed.py; what is truly specific to
one variant (ring plans, flex block tables, block-sparse layouts) stays in its own file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from space import TOL, Case, HypothesisDraw, assert_conforms, draw_case, errors, inputs

from dilexp.attention import available, build, capabilities, register, unregister
from dilexp.attention.registry import settings_of
from dilexp.attention.sdpa import SDPAttention
from dilexp.errors import ConfigError
from dilexp.main import CONF_DIR, _prepare
from dilexp.memory.base import NoPool
from dilexp.patterns.dilated import DilatedPattern

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
YAMLS = sorted((Path(CONF_DIR) / "attention").glob("*.yaml"))
CP = ["hardware=cp", "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true"]


def quick_paths(name: str) -> list[str]:
    caps = capabilities(name)
    return [p for p in caps.paths if p not in caps.slow_paths]


def own_settings(name: str, i: int) -> dict[str, Any]:
    """The i-th combination of the variant's declared extra settings (cycled, so fixed cases
    still visit every value)."""
    return {k: vals[(i + j) % len(vals)] for j, (k, vals) in enumerate(capabilities(name).settings.items())}


# -- fixed edge cases, per pattern kind ---------------------------------------------------

# (B, N, H, D, segment_lengths, dilation_rates): each row an edge of the dilated pattern.
DILATED_EDGES = {
    "multiples": (2, 24, 4, 8, [8, 16], [1, 2]),
    "ragged-w>=N-H%m": (2, 21, 5, 8, [4, 8, 64], [1, 2, 3]),
    "rate>length": (1, 13, 3, 4, [2, 5, 3], [4, 2, 1]),
    "empty-tail": (2, 10, 4, 8, [8], [4]),
    "w%r!=0": (2, 18, 3, 8, [6, 9, 18], [3, 2, 4]),
    "N<smallest-w": (1, 3, 3, 8, [4, 8, 16], [1, 2, 4]),
    "prime-N": (2, 37, 7, 8, [4, 8, 16], [1, 2, 4]),
}
# (B, N, H, D, settings) of the block-sparse pattern.
BLOCK_EDGES = {
    "multiple": (2, 64, 3, 8, dict(block_size=16, local_blocks=1, dilation=2, global_blocks=1)),
    "ragged": (2, 75, 3, 8, dict(block_size=16, local_blocks=1, dilation=2, global_blocks=1)),
    "global2": (1, 90, 2, 16, dict(block_size=8, local_blocks=0, dilation=3, global_blocks=2)),
    "window-only": (2, 50, 5, 4, dict(block_size=8, local_blocks=2, dilation=0, global_blocks=0)),
    "block>N": (1, 40, 2, 8, dict(block_size=64, local_blocks=0, dilation=0, global_blocks=0)),
    "block=1": (1, 33, 1, 8, dict(block_size=1, local_blocks=1, dilation=4, global_blocks=1)),
    "sparsity": (2, 130, 4, 8, dict(block_size=16, local_blocks=1, global_blocks=1, sparsity=0.6)),
}
FULL_EDGES = {"small": (2, 11, 3, 8, {}), "one": (1, 1, 1, 4, {}), "odd": (2, 33, 2, 16, {})}


def edge_cases(name: str) -> list[Case]:
    """The kind's edge cases, each over offsets x head layouts x causal x paths."""
    caps = capabilities(name)
    out: list[Case] = []
    if caps.pattern == "dilated":
        for b, n, h, d, seg, rates in DILATED_EDGES.values():
            for offsets in ("head", "group"):
                for heads in caps.head_layouts:
                    for causal in (False, True):
                        i = len(out)
                        s = {"segment_lengths": seg, "dilation_rates": rates, "offsets": offsets, "heads": heads,
                             **own_settings(name, i)}
                        paths = quick_paths(name)
                        out.append(Case(name, s, h, d, n, b, causal, paths[i % len(paths)], seed=i))
        return out
    table = BLOCK_EDGES if caps.pattern == "block_sparse" else FULL_EDGES
    for b, n, h, d, s in table.values():
        for causal in (False, True):
            for path in quick_paths(name):
                i = len(out)
                out.append(Case(name, {**s, **own_settings(name, i)}, h, d, n, b, causal, path, seed=i))
    return out


def base_case(name: str, n: int = 16, h: int = 4, d: int = 8, causal: bool = True, **over: Any) -> Case:
    """A small valid case of the variant's kind (its own settings at their first value)."""
    kind = capabilities(name).pattern
    s: dict[str, Any] = {"dilated": {"segment_lengths": [4, 8], "dilation_rates": [1, 2]},
                         "block_sparse": {"block_size": 4, "local_blocks": 0, "dilation": 3, "global_blocks": 1},
                         "full": {}}[kind]
    s = {**s, **{k: v[0] for k, v in capabilities(name).settings.items()}, **over}
    return Case(name, s, h, d, n, 2, causal, quick_paths(name)[0])


# -- equality with the dense reference ----------------------------------------------------


def test_every_variant_declares_what_the_suite_needs() -> None:
    for name in VARIANTS:
        caps = capabilities(name)
        assert caps.pattern in ("full", "dilated", "block_sparse"), (name, caps.pattern)
        assert quick_paths(name), f"{name}: every path is slow; the quick tests need one"
        assert set(caps.head_layouts) <= {"grouped", "all"}
        assert (caps.pattern == "dilated") == bool(caps.head_layouts), name
        attn = base_case(name).build()
        for path in caps.paths:
            attn.use_path(path)
        with pytest.raises(ValueError, match="no path"):
            attn.use_path("no-such-path")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_equals_the_dense_reference(name: str, device: str, data: st.DataObject) -> None:
    """fp32 output, q/k/v gradients (where the variant has a backward here) and lse (where
    exposed) over drawn N, H, D, patterns, causal, offsets, head layouts, paths, strided input."""
    case = draw_case(name, HypothesisDraw(data.draw))
    assert_conforms(case, torch.float32, device)


@pytest.mark.parametrize("name", VARIANTS)
def test_edge_cases_equal_the_dense_reference(name: str) -> None:
    for case in edge_cases(name):
        assert_conforms(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
@pytest.mark.parametrize("name", VARIANTS)
def test_other_dtypes_within_tolerance(name: str, dtype: torch.dtype, device: str) -> None:
    for i, heads in enumerate(capabilities(name).head_layouts or ("-",)):
        for path in quick_paths(name):
            over = {"heads": heads} if heads != "-" else {}
            case = base_case(name, n=45, h=4, d=16, **over)
            case.seed, case.path = i, path
            assert_conforms(case, dtype, device)


def wrong_oracle(case: Case) -> torch.Tensor:
    """A pattern that differs from the case's on its shape."""
    kind = capabilities(case.variant).pattern
    if kind == "dilated":
        flipped = "group" if case.settings["offsets"] == "head" else "head"
        wrong = DilatedPattern.from_config(case.settings["segment_lengths"], case.settings["dilation_rates"],
                                           flipped, case.settings.get("heads", "grouped"))
        return wrong.dense_multiplicity(case.n, case.num_heads)
    return DilatedPattern.from_config([4], [2]).dense_multiplicity(case.n, case.num_heads)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_wrong_pattern_is_caught(name: str) -> None:
    # The comparison must be able to fail: the same module against another pattern's oracle.
    case = base_case(name, n=16, causal=False, offsets="head") if capabilities(name).pattern == "dilated" \
        else base_case(name, n=16, causal=False)
    assert errors(case).worst() <= TOL[torch.float32]
    assert errors(case, oracle=wrong_oracle(case)).out > 1e-2


class _DropLastKey(SDPAttention):
    """Deliberately wrong: every query misses the last key."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        n = q.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device)
        mask[:, -1] = n == 1
        if causal:
            mask = mask & torch.ones_like(mask).tril()
        mask[:, 0] = True  # keep every row non-empty
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


def test_a_broken_registered_variant_fails_the_suite() -> None:
    register("broken_for_test")(_DropLastKey)
    try:
        case = Case("broken_for_test", {}, 2, 8, 12, 1, False, "default")
        with pytest.raises(AssertionError):
            assert_conforms(case)
    finally:
        unregister("broken_for_test")
    assert "broken_for_test" not in available()


class _DirtyPool(NoPool):
    """Hands out NaN-filled buffers, as a reusing pool may hand out stale ones."""

    def empty(self, shape, dtype, device):  # type: ignore[override]
        return super().empty(shape, dtype, device).fill_(float("nan"))


@pytest.mark.parametrize("name", VARIANTS)
def test_unselected_rows_are_exact_zeros_even_from_a_dirty_pool(name: str) -> None:
    caps = capabilities(name)
    for heads in caps.head_layouts or ("-",):
        over = {"segment_lengths": [4, 8], "dilation_rates": [1, 4], "heads": heads} if heads != "-" else {}
        case = base_case(name, n=8, h=2, d=4, **over)
        attn = case.build(pool=_DirtyPool())
        assert_conforms(case, attn=attn)
        leaves, (q, k, v), _ = inputs(case, torch.float32)
        grad = caps.backward_on("cpu")
        with torch.set_grad_enabled(grad):
            out = attn(q, k, v, causal=True)
        empty = case.oracle().tril().sum(-1) == 0  # (H, N): rows with no allowed key
        assert torch.all(out.detach().permute(0, 2, 1, 3)[:, empty] == 0)
        assert not torch.isnan(out).any()
        if heads == "grouped":
            assert empty[1].any()  # head 1 (rate 4, offset 1) leaves rows unselected
        if grad:
            out.sum().backward()
            assert not any(torch.isnan(x.grad).any() for x in leaves)


@pytest.mark.parametrize("name", VARIANTS)
def test_no_grad_and_inference_mode_forward(name: str) -> None:
    case = base_case(name, n=12)
    ref_err = errors(case).out
    attn = case.build()
    _, (q, k, v), _ = inputs(case, torch.float32)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out = attn(q.detach(), k.detach(), v.detach(), causal=True)
        assert not out.requires_grad
        with torch.no_grad():
            again = case.build()(q.detach(), k.detach(), v.detach(), causal=True)
        assert (out - again).abs().max() <= 1e-6 and ref_err <= 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_prepare_makes_the_calls_cache_hits(name: str) -> None:
    case = base_case(name, n=19)
    attn = case.build(cache="local")
    attn.prepare(case.n, "cpu", causal=True)
    built = attn.cache.stats()["misses"]
    assert_conforms(case, attn=attn)
    assert attn.cache.stats()["misses"] == built


@pytest.mark.parametrize("strategy", ["none", "local", "cpu", "gpu"])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_cache_strategy_gives_the_same_function(name: str, strategy: str) -> None:
    # cpu / gpu caches store copies and move them back on a hit: a pattern must survive that.
    case = base_case(name, n=21)
    attn = case.build(cache=strategy)
    for _ in range(3):
        assert_conforms(case, attn=attn)


# -- settings -----------------------------------------------------------------------------

COMMON_BAD = [
    ({"head_dim": 0}, "model.head_dim"),
    ({"head_dim": 6.5}, "model.head_dim"),
    ({"num_heads": True}, "model.n_head"),
    ({"num_heads": 0}, "model.n_head"),
    ({"window": 3}, "attention.window"),
]
KIND_BAD = {
    "full": [],
    "dilated": [
        ({"segment_lengths": [4, 8], "dilation_rates": [1]}, "attention.dilation_rates"),
        ({"segment_lengths": [4, -1], "dilation_rates": [1, 2]}, "attention.segment_lengths"),
        ({"segment_lengths": ["a", 8], "dilation_rates": [1, 2]}, "attention.segment_lengths"),
        ({"segment_lengths": [], "dilation_rates": []}, "attention.segment_lengths"),
        ({"segment_lengths": [4, 8], "dilation_rates": [0, 2]}, "attention.dilation_rates"),
        ({"offsets": "x"}, "attention.offsets"),
        ({"heads": "x"}, "attention.heads"),
        ({"segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4], "num_heads": 2}, "model.n_head"),
    ],
    "block_sparse": [
        ({"block_size": 0}, "attention.block_size"),
        ({"block_size": 8.5}, "attention.block_size"),
        ({"local_blocks": -1}, "attention.local_blocks"),
        ({"dilation": -2}, "attention.dilation"),
        ({"global_blocks": True}, "attention.global_blocks"),
        ({"sparsity": 1.0}, "attention.sparsity"),
        ({"sparsity": -0.1}, "attention.sparsity"),
        ({"sparsity": "high"}, "attention.sparsity"),
    ],
}
BAD = [(name, kw, f) for name in VARIANTS for kw, f in COMMON_BAD + KIND_BAD[capabilities(name).pattern]]


@pytest.mark.parametrize(("name", "kwargs", "field"), BAD,
                         ids=[f"{n}-{f}-{'-'.join(map(str, kw.values()))}" for n, kw, f in BAD])
def test_bad_settings_fail_at_construction_naming_the_field(name: str, kwargs: dict, field: str) -> None:
    case = base_case(name)
    args = {"num_heads": case.num_heads, "head_dim": case.head_dim, **case.settings, **kwargs}
    with pytest.raises(ConfigError) as e:
        build(name, **args)
    assert e.value.field == field
    assert str(e.value).startswith(field)


def _yaml_settings(path: Path) -> tuple[str, dict[str, Any]]:
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(cfg, dict)
    return cfg.pop("name"), {k: v for k, v in cfg.items() if k != "defaults"}


def test_every_variant_has_a_yaml() -> None:
    assert {_yaml_settings(p)[0] for p in YAMLS} == set(VARIANTS)


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_every_shipped_yaml_builds_and_equals_the_reference(path: Path) -> None:
    # With the default LM's shapes: 4 heads of 32, seq_len 512.
    name, cfg = _yaml_settings(path)
    assert name == path.stem
    accepted = settings_of(name)
    assert accepted is None or set(cfg) <= accepted, set(cfg) - (accepted or set())
    case = Case(name, cfg, 4, 32, 512, 1, True, quick_paths(name)[0])
    assert_conforms(case)


# -- declared capabilities, or a clear refusal ----------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_heads_all_is_declared_or_refused(name: str) -> None:
    caps = capabilities(name)
    if "all" in caps.head_layouts:
        assert_conforms(base_case(name, n=21, h=3, heads="all"))
        return
    args = {"num_heads": 4, "head_dim": 8, **base_case(name).settings, "heads": "all"}
    with pytest.raises(ConfigError) as e:
        build(name, **args)
    assert e.value.field == "attention.heads"


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_on_cpu_is_declared_or_refused(name: str, compose_cfg) -> None:
    case = base_case(name)
    if capabilities(name).backward_on("cpu"):
        assert errors(case).grad is not None
        return
    attn = case.build()
    _, (q, k, v), _ = inputs(case, torch.float32)
    with pytest.raises(NotImplementedError, match="backward"):
        attn(q, k, v, causal=True)
    assert attn.cache.stats()["misses"] == 0  # refused before any work
    # Training it on a CPU is refused up front, naming the field.
    with pytest.raises(ConfigError) as e:
        _prepare(compose_cfg([f"attention={name}"]))
    assert e.value.field == "attention.name" and "backward" in str(e.value)


@pytest.mark.parametrize("name", VARIANTS)
def test_lse_is_declared_or_refused(name: str) -> None:
    case = base_case(name, n=17)
    if capabilities(name).lse:
        assert errors(case).lse <= TOL[torch.float32]
        return
    _, (q, k, v), _ = inputs(case, torch.float32)
    with pytest.raises(NotImplementedError, match="log-sum-exp"):
        case.build().forward_lse(q, k, v)


@pytest.mark.parametrize("name", [n for n in VARIANTS if not capabilities(n).process_groups])
def test_hardware_cp_refuses_a_variant_without_process_groups(name: str, compose_cfg) -> None:
    with pytest.raises(ConfigError) as e:
        _prepare(compose_cfg([f"attention={name}", *CP]))
    assert e.value.field == "attention.name"
    if capabilities(name).backward_on("cpu"):  # else the missing backward is named first
        assert "process_groups" in str(e.value)


# -- slow paths (compiled kernels): fixed shapes, so each compiles once ----------------------

SLOW = [(n, p) for n in VARIANTS for p in capabilities(n).slow_paths]
# H = 5 over 3 pairs: groups of 2, 2, 1. N = 200 is a multiple of no segment length.
SLOW_PATTERNS = [
    {"segment_lengths": [32, 64, 128], "dilation_rates": [1, 2, 4], "offsets": "head", "heads": "grouped"},
    {"segment_lengths": [48, 100, 300], "dilation_rates": [2, 3, 5], "offsets": "group", "heads": "grouped"},
    {"segment_lengths": [32, 64], "dilation_rates": [2, 4], "offsets": "head", "heads": "all"},
]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex heads='all'")
@pytest.mark.parametrize(("name", "path"), SLOW, ids=[f"{n}-{p}" for n, p in SLOW])
def test_slow_paths_equal_the_dense_reference(name: str, path: str) -> None:
    caps = capabilities(name)
    assert caps.pattern == "dilated", "add fixed shapes for this kind"
    for i, pattern in enumerate(SLOW_PATTERNS):
        if pattern["heads"] not in caps.head_layouts:
            continue
        for causal in (False, True):
            own = {k: max(v) for k, v in caps.settings.items()}  # one value: one compile
            case = Case(name, {**pattern, **own}, 5, 16, 200, 2, causal, path, seed=i)
            assert_conforms(case)
