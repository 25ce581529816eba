"""The conformance suite across real process groups (gloo on CPU): every variant that declares
``capabilities.process_groups`` against the float64 reference, and every other one refused.

One group of 2 and one of 4 processes (FileStore rendezvous in tmp_path) each run many drawn
cases, because starting processes costs far more than a small case. Cases come from the same
space as the in-process suite (space.py), drawn with a seeded ``random.Random``: Hypothesis
cannot drive code in spawned processes. Every rank computes the reference of the whole
sequence and compares its shard of the output, the q/k/v gradients and the lse. In the
4-process group the cases also run on two rings of two ranks (data x context parallel).
Ring-specific behaviour (transfers skipped, failures named) is in test_ring_distributed.py.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from dilexp.attention import available, capabilities, with_capability

GROUP_TIMEOUT_S = 30.0
DEADLINE_S = 200.0
CASES_PER_VARIANT = 10


def _run_case(case_dict: dict[str, Any]) -> dict[str, Any]:
    import space

    from dilexp import distributed as D
    from dilexp.attention.reference import dense_reference, reference_lse

    case = space.Case(**case_dict)
    rank, world = D.group_rank_world(D.context_parallel_group())
    placement = case.settings.get("placement", "contiguous")
    attn = case.build(seq_len=case.n if case.seed % 2 else None)  # with and without set_shard
    leaves, (q, k, v), g = space.inputs(case, torch.float32)
    q, k, v = (x.detach() for x in (q, k, v))

    def shard(x: torch.Tensor) -> torch.Tensor:
        return D.shard_sequence(x, rank, world, placement)

    ql, kl, vl = (shard(x).clone().requires_grad_() for x in (q, k, v))
    out = attn(ql, kl, vl, causal=case.causal)
    out.backward(shard(g))
    _, lse = attn.forward_lse(ql.detach(), kl.detach(), vl.detach(), causal=case.causal)

    mult = case.oracle()
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = dense_reference(q64, k64, v64, mult, case.causal)
    ref.backward(g.double())
    grad_err = max((x.grad.double() - shard(y.grad)).abs().max().item()
                   for x, y in ((ql, q64), (kl, k64), (vl, v64)))
    full = D.unshard_sequence(out.detach(), case.n, placement=placement)
    return {"case": repr(case), "fwd": (out.double() - shard(ref)).abs().max().item(), "bwd": grad_err,
            "lse": space.lse_error(lse, shard(reference_lse(q64.detach(), k64.detach(), mult, case.causal))),
            "unshard": (full.double() - ref).abs().max().item()}


def _refusals() -> dict[str, str | None]:
    """Every variant without process groups, called while a cp group is registered."""
    import space

    found: dict[str, str | None] = {}
    for name in with_capability(process_groups=False):
        case = space.Case(name, {}, 2, 4, 8)
        if capabilities(name).pattern == "dilated":
            case.settings = {"segment_lengths": [4], "dilation_rates": [1]}
        x = torch.randn(1, 4, 2, 4)
        try:
            with torch.no_grad():
                case.build()(x, x, x)
            found[name] = None
        except RuntimeError as e:
            found[name] = str(e)
    return found


def _worker(rank: int, world: int, store: str, out_dir: str, cases: list[dict[str, Any]], tests_dir: str) -> None:
    import sys

    sys.path.insert(0, tests_dir)  # space.py, as in the parent
    torch.set_num_threads(1)
    result: dict[str, Any] = {"cases": [], "error": None}
    try:
        from dilexp import distributed as D

        D.init_process_group(rank, world, backend="gloo", store_path=store, timeout_s=GROUP_TIMEOUT_S)
        for case in cases:
            result["cases"].append(_run_case(case))
        result["refused"] = _refusals()
        if world == 4:
            # Data x context parallel: two rings of two ranks; ring ranks 0/1 are global 2/3 in
            # the second group, which the transfers must translate.
            D.init_context_parallel(size=2)
            for case in cases[::3]:
                result["cases"].append({**_run_case(case), "kind": "cp2"})
        D.destroy_process_group()
    except Exception:  # reported by the parent, which knows which test this is
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def drawn_cases(world: int) -> list[dict[str, Any]]:
    """Cases of every process-group variant, N >= world, up to 40 so segments span shards."""
    from space import RandomDraw, draw_case

    out = []
    for name in with_capability(process_groups=True):
        d = RandomDraw(seed=1000 * world + len(name))
        for _ in range(CASES_PER_VARIANT):
            case = draw_case(name, d, max_n=40, min_n=world, layouts=("bnhd",))
            out.append(case.__dict__)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_process_group_variants_equal_the_reference_and_others_refuse(world: int, gloo_group) -> None:
    assert with_capability(process_groups=True), "no variant declares process groups"
    results = gloo_group(_worker, world, drawn_cases(world), str(Path(__file__).parent), deadline_s=DEADLINE_S)
    for r, res in enumerate(results):
        for c in res["cases"]:
            worst = max(c["fwd"], c["bwd"], c["lse"], c["unshard"])
            assert worst <= 1e-4, (f"rank {r}/{world} {c.get('kind', 'cp')}", c)
        for name, err in res["refused"].items():
            assert err is not None and "context-parallel group" in err and name in err, (name, err)
    assert set(results[0]["refused"]) == set(available()) - set(with_capability(process_groups=True))
