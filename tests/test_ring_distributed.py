"""``ring_v2`` / ``ring_v3`` across real process groups (gloo on CPU): what is specific to the ring.

Transfers: K/V travel only as far as a shard is needed (nothing at all when every segment
fits in a shard), block pairs are counted and skipped, and a dead or hung peer is an error
naming the ranks, not a hang. Equality with the reference over drawn cases, for every
variant with process groups, is in tests/conformance/test_conformance_distributed.py.
Each test spawns one group (2 or 4 processes, FileStore rendezvous in tmp_path); every wait
is bounded: the group has a timeout and the parent kills the children past a deadline.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

H, DH, B = 6, 8, 2
PATTERNS = {
    "grouped": ([4, 8, 16], [1, 2, 4], "grouped", "head"),
    "all-heads": ([5, 12], [2, 3], "all", "head"),
    "w>=N-group-offsets": ([3, 7, 100], [1, 2, 3], "grouped", "group"),
    "short": ([4, 8], [1, 2], "grouped", "head"),  # every segment fits in a shard of 32 / 4
}
GROUP_TIMEOUT_S = 30.0
DEADLINE_S = 150.0


def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    from dilexp import distributed as D
    from dilexp.attention import build
    from dilexp.attention.reference import dense_reference

    rank, world = D.group_rank_world(D.context_parallel_group())

    seg, rates, heads, offsets = PATTERNS[case["pattern"]]
    n, causal, placement = case["n"], case["causal"], case["placement"]
    attn = build(case["variant"], num_heads=H, head_dim=DH, segment_lengths=seg, dilation_rates=rates,
                 heads=heads, offsets=offsets, chunks=case["chunks"], placement=placement,
                 seq_len=n if case["set_shard"] else None)
    attn.use_fused = not case.get("portable", False)  # the matmul path other devices take
    gen = torch.Generator().manual_seed(case["seed"])
    q, k, v, g = (torch.randn(B, n, H, DH, generator=gen) for _ in range(4))

    def shard(x: torch.Tensor) -> torch.Tensor:
        return D.shard_sequence(x, rank, world, placement)

    ql, kl, vl = (shard(x).clone().requires_grad_() for x in (q, k, v))
    out = attn(ql, kl, vl, causal=causal)
    out.backward(shard(g))

    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = dense_reference(q64, k64, v64, attn.dense_multiplicity(n), causal)
    ref.backward(g.double())
    grad_err = max((x.grad.double() - shard(y.grad)).abs().max().item()
                   for x, y in ((ql, q64), (kl, k64), (vl, v64)))
    full = D.unshard_sequence(out.detach(), n, placement=placement)
    return {
        **case,
        "fwd": (out.double() - shard(ref)).abs().max().item(),
        "bwd": grad_err,
        "unshard": (full.double() - ref).abs().max().item(),
        "stats": attn.ring_stats(),
    }


def _failure_cases(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 hangs (never calls), then dies; rank 0 must raise, naming rank 1, not hang."""
    from dilexp import distributed as D
    from dilexp.attention import build
    from dilexp.attention.ring import RingCommError

    n = 24
    x = D.shard_sequence(torch.randn(1, n, H, DH), rank, world)
    found: dict[str, Any] = {}
    if rank == 1:
        time.sleep(3.0)
        return found  # the process then exits: a dead peer for rank 0's second call
    for what, timeout in (("hang", 1.0), ("dead", GROUP_TIMEOUT_S)):
        attn = build("ring_v2", num_heads=H, head_dim=DH, segment_lengths=[64], dilation_rates=[1],
                     seq_len=n, timeout_s=timeout)
        t0 = time.monotonic()
        try:
            attn(x, x, x)
            found[what] = {"error": None}
        except RingCommError as e:
            found[what] = {"error": str(e), "seconds": time.monotonic() - t0}
    return found


def _worker(rank: int, world: int, store: str, out_dir: str, cases: list[dict[str, Any]], failures: bool) -> None:
    torch.set_num_threads(1)
    result: dict[str, Any] = {"cases": [], "error": None}
    try:
        from dilexp import distributed as D

        D.init_process_group(rank, world, backend="gloo", store_path=store, timeout_s=GROUP_TIMEOUT_S)
        for case in cases:
            result["cases"].append(_run_case(case))
        if world == 4:
            # Data x context parallel: two rings of two ranks; ring ranks 0/1 are global 2/3 in
            # the second group, which the transfers must translate.
            D.init_context_parallel(size=2)
            for case in cases[:2]:
                result["cases"].append({**_run_case(case), "kind": "cp2"})
        if failures:
            result["failures"] = _failure_cases(rank, world)
        D.destroy_process_group()
    except Exception:  # reported by the parent, which knows which test this is
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _cases(world: int) -> list[dict[str, Any]]:
    """Segments spanning shards (K/V must travel) and segments inside shards (nothing may)."""
    cases = []
    for i, (pattern, variant) in enumerate([("all-heads", "ring_v2"), ("w>=N-group-offsets", "ring_v3")]):
        cases.append({"pattern": pattern, "causal": False, "placement": "contiguous", "variant": variant,
                      "n": 37, "chunks": 1 + i, "set_shard": i == 0, "seed": i, "kind": "exact"})
    for causal in (False, True):
        cases.append({"pattern": "short", "causal": causal, "placement": "contiguous", "variant": "ring_v2",
                      "n": 32, "chunks": 2, "set_shard": True, "seed": 99, "kind": "fits"})
    return cases


def _check(results: list[dict], world: int) -> None:
    for r, res in enumerate(results):
        for c in res["cases"]:
            label = f"rank {r}/{world} {c['kind']} {c['variant']} {c['pattern']} causal={c['causal']} {c['placement']}"
            assert c["fwd"] <= 1e-4 and c["bwd"] <= 1e-4 and c["unshard"] <= 1e-4, (label, c)
            assert c["stats"]["calls"] == 1
            ring = 2 if c["kind"] == "cp2" else world
            # Forward and backward each visit ring x chunks^2 block pairs.
            assert c["stats"]["steps"] == 2 * ring * c["chunks"] ** 2, (label, c["stats"])
            if c["kind"] == "fits":
                # Nothing travels, and every pair against a remote shard is skipped.
                assert c["stats"]["bytes_sent"] == 0, (label, c["stats"])
                assert c["stats"]["skipped_steps"] >= 2 * (world - 1) * c["chunks"] ** 2, (label, c["stats"])
            elif not c["causal"] and c["placement"] == "contiguous" and c["pattern"] != "grouped":
                assert c["stats"]["bytes_sent"] > 0, (label, c["stats"])


def test_two_ranks(gloo_group) -> None:
    results = gloo_group(_worker, 2, _cases(2), True, deadline_s=DEADLINE_S)
    _check(results, 2)
    hang, dead = results[0]["failures"]["hang"], results[0]["failures"]["dead"]
    for what in (hang, dead):
        assert what["error"] is not None and "rank 0 of 2" in what["error"] and "[1]" in what["error"], what
    assert hang["seconds"] < 10, hang
    assert dead["seconds"] < GROUP_TIMEOUT_S, dead


def test_four_ranks(gloo_group) -> None:
    _check(gloo_group(_worker, 4, _cases(4), False, deadline_s=DEADLINE_S), 4)
