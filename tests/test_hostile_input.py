"""Issue 14, items 9, 11 and 12: wrongly typed run records, ring attention's default group, and
a dead rank in the logging all-reduce."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

# -- item 9: dilexp.compare on well-formed JSON with wrong types --------------------------------

WRONG = [
    ({"choices": [1, 2]}, "choices"),
    ({"choices": {"attention": {"name": "x"}}}, "choices.attention"),
    ({"overrides": 5}, "overrides"),
    ({"overrides": [1, 2]}, "overrides[0]"),
    ({"metrics": [1, 2]}, "metrics"),
    ({"metrics": {"val/loss": {"x": 1}}}, "metrics.val/loss"),
    ({"bench": {"a": 1}}, "bench"),
    ({"bench": [1]}, "bench[0]"),
    ({"status": {"a": 1}}, "status"),
    ({"task": [1]}, "task"),
]


@pytest.mark.parametrize(("fields", "name"), WRONG, ids=[w[1] for w in WRONG])
def test_compare_names_file_and_field_of_a_wrongly_typed_record(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                fields: dict[str, Any], name: str) -> None:
    from dilexp.compare import main

    good = tmp_path / "good"
    good.mkdir()
    (good / "summary.json").write_text(json.dumps({"status": "completed", "task": "train", "choices": {
        "attention": "dilated"}, "overrides": [], "metrics": {"val/loss": 1.0}}))
    bad = tmp_path / "bad"
    bad.mkdir()
    record = {"status": "completed", "task": "train", "choices": {"attention": "sdpa"}, "overrides": [],
              "metrics": {"val/loss": 2.0}, **fields}
    (bad / "summary.json").write_text(json.dumps(record))
    main([str(tmp_path)])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if str(bad / "summary.json") in ln]
    assert len(lines) == 1 and f"'{name}'" in lines[0], err
    assert "Traceback" not in err and "AttributeError" not in err
    assert "corrupt" in out  # the bad run is a row of its own, the good one is still compared


# -- item 11: a ring given no group, with torch.distributed started by the caller ---------------

N, H, DH = 128, 4, 8


def _ring_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    result: dict[str, Any] = {"error": None}
    try:
        import torch.distributed as dist

        from dilexp import distributed as D
        from dilexp.attention import build
        from dilexp.attention.reference import dense_reference

        torch.set_num_threads(1)
        # The caller's own group: no hardware=cp, no registered context-parallel group.
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
        gen = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(1, N, H, DH, generator=gen) for _ in range(3))
        # One segment of N at rate 1: every query sees every key, so the reference mask is all ones
        # (taken from no attention module).
        ones = torch.ones(H, N, N, dtype=torch.int64)
        lo, hi = rank * N // world, (rank + 1) * N // world
        for causal in (False, True):
            attn = build("ring_v2", num_heads=H, head_dim=DH, segment_lengths=[N], dilation_rates=[1])
            out = attn(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], causal=causal)
            ref = dense_reference(q.double(), k.double(), v.double(), ones, causal)[:, lo:hi]
            result[f"default causal={causal}"] = (out.double() - ref).abs().max().item()
        # A job that declared data parallelism (whole sequences on every rank) keeps the ring local.
        D.declare_data_parallel()
        attn = build("ring_v2", num_heads=H, head_dim=DH, segment_lengths=[N], dilation_rates=[1])
        out = attn(q, k, v)
        ref = dense_reference(q.double(), k.double(), v.double(), ones)
        result["data parallel"] = (out.double() - ref).abs().max().item()
        dist.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_ring_without_a_group_uses_the_callers_default_group(gloo_group) -> None:
    results = gloo_group(_ring_worker, 2, deadline_s=120.0)
    for res in results:
        for key in ("default causal=False", "default causal=True", "data parallel"):
            assert res[key] < 1e-5, (key, res)


# -- item 12: a dead rank in the logging all-reduce -------------------------------------------


def _dead_peer_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    result: dict[str, Any] = {"error": None}
    try:
        from dilexp import distributed as D
        from dilexp.tasks.context_parallel import ContextParallel

        torch.set_num_threads(1)
        D.init_process_group(rank, world, backend="gloo", store_path=store, timeout_s=20.0)
        if rank == 1:
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
            return  # this rank dies before the all-reduce
        time.sleep(2.0)
        cp = ContextParallel(seq_len=8, placement="contiguous", world=world, timeout_s=10.0)
        try:
            cp.sum(torch.ones(1))
            result["raised"] = None
        except Exception as e:  # noqa: BLE001 - the message is what the test reads
            result["raised"] = f"{type(e).__name__}: {e}"
    except Exception:
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_a_dead_rank_in_the_logging_all_reduce_is_named(gloo_group) -> None:
    res = gloo_group(_dead_peer_worker, 2, deadline_s=120.0)[0]
    msg = res["raised"]
    assert msg is not None, res
    assert "\n" not in msg
    assert "rank 0 of 2" in msg and "rank 1 probably died" in msg, msg
