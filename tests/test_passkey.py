"""Passkey retrieval: where the probe puts the key and the query, and the grid against models
whose answers we know (one that reads the whole context, one that sees only its last 16 tokens)."""

from __future__ import annotations

import pytest
import torch

from dilexp.evals.passkey import PasskeyVocab, passkey_batch, run_passkey
from dilexp.evals.plots import passkey_heatmap

pytestmark = pytest.mark.usefixtures("one_thread")

K = 31  # the keys of a 64-token recall vocabulary (blank filler): keys 1..31, values 32..62
VOCAB = PasskeyVocab(num_keys=K)
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("length", [3, 4, 16, 63, 64, 257])
@pytest.mark.parametrize("depth", DEPTHS)
def test_key_at_the_requested_depth_and_the_query_last(length: int, depth: float) -> None:
    ids, answers, pos = passkey_batch(length, depth, samples=8, vocab=VOCAB, seed=3)
    assert ids.shape == (8, length) and answers.shape == (8,)
    keys = ids[:, -1]
    assert ((keys >= 1) & (keys <= K)).all()
    assert ((answers > K) & (answers <= 2 * K)).all()
    # The binding: the query's key, then the answer, at the position the depth names.
    assert torch.equal(ids[:, pos], keys) and torch.equal(ids[:, pos + 1], answers)
    usable = length - 3  # the key's last possible position: value and query must follow it
    assert abs(pos - depth * usable) <= 0.5, (pos, depth * usable)
    if depth == 1.0:
        assert pos == length - 3
    # Everything else is blank filler: one binding, asked once.
    rest = torch.ones(length, dtype=torch.bool)
    rest[[pos, pos + 1, length - 1]] = False
    assert (ids[:, rest] == 0).all()


def test_depth_moves_the_key_from_the_start_to_the_end() -> None:
    positions = [passkey_batch(1000, d, 1, VOCAB)[2] for d in [i / 20 for i in range(21)]]
    assert positions == sorted(positions)
    assert positions[0] <= 1 and positions[-1] == 997


def test_random_filler_stays_in_its_range_and_never_looks_like_the_key() -> None:
    vocab = PasskeyVocab(num_keys=15, filler=(31, 64))
    ids, answers, pos = passkey_batch(128, 0.5, samples=16, vocab=vocab, seed=1)
    rest = torch.ones(128, dtype=torch.bool)
    rest[[pos, pos + 1, 127]] = False
    assert ((ids[:, rest] >= 31) & (ids[:, rest] < 64)).all()
    assert ((answers >= 16) & (answers <= 30)).all()


def test_probes_are_deterministic_per_seed() -> None:
    a = passkey_batch(64, 0.5, 32, VOCAB, seed=7)[0]
    assert torch.equal(a, passkey_batch(64, 0.5, 32, VOCAB, seed=7)[0])
    assert not torch.equal(a, passkey_batch(64, 0.5, 32, VOCAB, seed=8)[0])
    # A cell's probes do not depend on which other cells the grid has.
    grid_small = run_passkey(_Perfect(), [64], [0.5], 4, VOCAB, seed=7)
    grid_big = run_passkey(_Perfect(), [16, 64, 128], [0.0, 0.5], 4, VOCAB, seed=7)
    assert grid_small.key_positions[0][0] == grid_big.key_positions[1][1]


class _Perfect:
    """Finds the query key's earlier occurrence and answers the token after it: full logits (B, N, V)."""

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        logits = torch.zeros(b, n, 2 * K + 1)
        for i in range(b):
            where = (ids[i, :-1] == ids[i, -1]).nonzero().flatten()
            logits[i, -1, ids[i, int(where[0]) + 1]] = 1.0
        return logits


class _LastTokens:
    """Sees only its last ``window`` tokens (the query included): answers what it can find there,
    else nothing (all-zero logits: the argmax is the blank token, never a value). Last logits only."""

    def __init__(self, window: int) -> None:
        self.window = window

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        seen = ids[:, -self.window:]
        logits = torch.zeros(ids.shape[0], 2 * K + 1)
        for i in range(ids.shape[0]):
            where = (seen[i, :-1] == seen[i, -1]).nonzero().flatten()
            if len(where):
                logits[i, seen[i, int(where[0]) + 1]] = 1.0
        return logits


def test_a_perfect_model_gets_every_cell_right() -> None:
    grid = run_passkey(_Perfect(), [16, 64, 256], DEPTHS, samples=8, vocab=VOCAB, seed=0, batch_size=3)
    assert grid.acc == [[1.0] * 3 for _ in DEPTHS]
    assert grid.mean == 1.0
    assert grid.metrics() == {"passkey/acc": 1.0, "passkey/acc_len/16": 1.0, "passkey/acc_len/64": 1.0,
                              "passkey/acc_len/256": 1.0}


def test_a_model_that_sees_16_tokens_finds_only_keys_within_16_tokens_of_the_end() -> None:
    grid = run_passkey(_LastTokens(16), [16, 64, 256], DEPTHS, samples=8, vocab=VOCAB, seed=0)
    # At 16 tokens the whole probe is in view; at 64 and 256 only depth 1.0 (2 tokens back) is.
    assert grid.acc == [
        [1.0, 0.0, 0.0],   # depth 0
        [1.0, 0.0, 0.0],   # 0.25
        [1.0, 0.0, 0.0],   # 0.5
        [1.0, 0.0, 0.0],   # 0.75 (45 of 64 tokens: 18 back)
        [1.0, 1.0, 1.0],   # 1.0
    ]
    # A wider view reaches further back: 0.75 at 64 is 18 tokens back.
    assert run_passkey(_LastTokens(20), [64], [0.75], 8, VOCAB).acc == [[1.0]]


def test_chunking_does_not_change_the_result() -> None:
    model = _LastTokens(40)
    whole = run_passkey(model, [32, 96], DEPTHS, samples=10, vocab=VOCAB, seed=5)
    chunked = run_passkey(model, [32, 96], DEPTHS, samples=10, vocab=VOCAB, seed=5, batch_size=3)
    assert whole.acc == chunked.acc and whole.to_dict() == chunked.to_dict()


def test_heatmap_is_written(tmp_path) -> None:
    grid = run_passkey(_LastTokens(16), [16, 64, 256], DEPTHS, samples=4, vocab=VOCAB)
    out = passkey_heatmap(grid, tmp_path / "passkey.png", train_len=64)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5_000
