"""The recall task's layout and the accuracy-by-distance eval.

The eval is checked with a constructed model: a hand-set induction head (query = the current
token, key = the previous token, value = the token itself) run through an attention variant.
Through full attention it recalls at every distance; through a dilated pattern whose only
segment is 16 tokens it can only recall what lies inside the segment, and the distance bins
must show exactly that.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dilexp.attention import build
from dilexp.data.recall import BLANK, RecallDataset, check_recall_settings
from dilexp.errors import ConfigError
from dilexp.evals import BinnedTotals, bin_label, pow2_bin


def test_layout_pairs_before_queries_and_answers_masked() -> None:
    ds = RecallDataset(seq_len=128, vocab_size=64, num_pairs=8, num_queries=8, num_samples=20)
    for i in range(len(ds)):
        item = ds[i]
        seq = torch.cat([item["input_ids"], item["targets"][-1:]])
        c = ds.split_at
        keys_ctx = [(p, int(t)) for p, t in enumerate(seq[:c].tolist()) if ds.key0 <= t < ds.val0]
        assert len(keys_ctx) == 8 and len({k for _, k in keys_ctx}) == 8  # distinct keys, all in the context
        binding = {k: int(seq[p + 1]) for p, k in keys_ctx}
        q_pos = item["loss_mask"].nonzero().flatten().tolist()
        assert len(q_pos) == 8 and all(p >= c for p in q_pos)
        for p in q_pos:
            key = int(item["input_ids"][p])
            assert item["targets"][p] == binding[key]  # the answer is the bound value
            last = max(j for j in range(p) if int(item["input_ids"][j]) == key)
            assert item["distance"][p] == p - last
        # Filler is the blank token; nothing else is in the sequence.
        assert int((seq == BLANK).sum()) == 129 - 32


def test_deterministic_per_seed_and_split() -> None:
    a = RecallDataset(seq_len=64, seed=3)[5]
    b = RecallDataset(seq_len=64, seed=3)[5]
    c = RecallDataset(seq_len=64, seed=3, split="val")[5]
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_distances_cover_the_context() -> None:
    ds = RecallDataset(seq_len=256, vocab_size=64, num_pairs=8, num_queries=8, num_samples=200)
    d = torch.cat([ds[i]["distance"][ds[i]["loss_mask"]] for i in range(len(ds))])
    assert int(d.min()) <= 8 and int(d.max()) >= 200


def test_random_filler_and_packed_layout() -> None:
    ds = RecallDataset(seq_len=64, vocab_size=64, num_pairs=4, num_queries=4, filler="random", pair_layout="packed")
    item = ds[0]
    assert torch.all(item["input_ids"][:8:2] < ds.val0) and torch.all(item["input_ids"][1:8:2] >= ds.val0)
    assert int((item["input_ids"] >= ds.fill0).sum()) > 30
    assert ds.chance == pytest.approx(1 / 15)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_pairs=40), "data.num_pairs"),
        (dict(num_queries=0), "data.num_queries"),
        (dict(num_queries=100), "data.num_queries"),
        (dict(seq_len=10, num_pairs=8), "data.seq_len"),
        (dict(filler="noise"), "data.filler"),
        (dict(pair_layout="x"), "data.pair_layout"),
        (dict(context_fraction=1.0), "data.context_fraction"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    args = dict(seq_len=64, vocab_size=64, num_pairs=8, num_queries=8) | kwargs
    with pytest.raises(ConfigError) as err:
        check_recall_settings(**args)
    assert str(err.value).startswith(field + "=")


def test_pow2_bins_by_hand() -> None:
    x = torch.tensor([1, 2, 3, 4, 7, 8, 15, 16, 1023, 1024])
    assert pow2_bin(x).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 9, 10]
    assert [bin_label(i) for i in range(4)] == ["1-1", "2-3", "4-7", "8-15"]
    with pytest.raises(ValueError):
        pow2_bin(torch.tensor([0]))


def test_accuracy_by_distance_from_hand_made_logits() -> None:
    # Two sequences, answers at distances 2, 5, 6, 20 and 3; the logits are right for 2, 6, 3 only.
    distance = torch.tensor([[2, 0, 5, 6, 20], [0, 3, 0, 0, 0]])
    mask = distance > 0
    targets = torch.tensor([[1, 0, 2, 3, 4], [0, 1, 0, 0, 0]])
    guess = torch.tensor([[1, 0, 0, 3, 0], [0, 1, 0, 0, 0]])
    logits = F.one_hot(guess, 5).float()
    hits = (logits.argmax(-1) == targets) & mask
    totals = BinnedTotals()
    totals.add(hits.float(), distance, mask)
    assert totals.means() == {"2-3": 1.0, "4-7": 0.5, "16-31": 0.0}
    assert totals.totals() == {"2-3": 2, "4-7": 2, "16-31": 1}
    # Ranks (or batches) add up before the division.
    doubled = totals.reduce(lambda t: 2 * t)
    assert doubled.means() == totals.means() and doubled.totals()["4-7"] == 4


def induction_logits(ids: torch.Tensor, vocab: int, attention: torch.nn.Module) -> torch.Tensor:
    """A constructed one-head induction model: attend to where the previous token was the current one."""
    onehot = F.one_hot(ids, vocab).float()  # (B, N, V)
    prev = torch.cat([torch.zeros_like(onehot[:, :1]), onehot[:, :-1]], dim=1)
    big = 40.0 * vocab**0.5  # a near-hard max after the 1/sqrt(D) scale
    q = (big * onehot)[:, :, None, :]
    k = prev[:, :, None, :]
    v = onehot[:, :, None, :]
    return attention(q, k, v, causal=True)[:, :, 0, :]


def distance_accuracy(attention_name: str, **attn: object) -> tuple[dict[str, float], float]:
    vocab = 64
    ds = RecallDataset(seq_len=64, vocab_size=vocab, num_pairs=8, num_queries=8, num_samples=200, split="val",
                       context_fraction=0.4)  # the query part does not start at a segment boundary
    batch = [ds[i] for i in range(len(ds))]
    ids = torch.stack([b["input_ids"] for b in batch])
    targets, mask = torch.stack([b["targets"] for b in batch]), torch.stack([b["loss_mask"] for b in batch])
    distance = torch.stack([b["distance"] for b in batch])
    attention = build(attention_name, num_heads=1, head_dim=vocab, **attn)
    logits = induction_logits(ids, vocab, attention)
    # Answer among the value tokens: a model that sees no binding guesses among them.
    answer = logits[..., ds.val0 : ds.val0 + ds.kv].argmax(-1) + ds.val0
    totals = BinnedTotals()
    totals.add((answer == targets).float(), distance, mask)
    return totals.means(), ds.chance


def test_full_attention_recalls_at_every_distance() -> None:
    acc, _ = distance_accuracy("sdpa")
    assert len(acc) >= 5  # distances from 2 tokens to the whole context (2-3 .. 32-63)
    assert all(a == 1.0 for a in acc.values()), acc


def test_a_16_token_segment_loses_recall_beyond_16() -> None:
    acc, chance = distance_accuracy("dilated", segment_lengths=[16], dilation_rates=[1])
    near = [a for lbl, a in acc.items() if int(lbl.split("-")[1]) < 8]
    far = [a for lbl, a in acc.items() if int(lbl.split("-")[0]) >= 16]
    assert near and far
    assert min(near) >= 5 * chance, acc  # recall inside the segment
    assert max(far) <= 2.5 * chance, acc  # nothing to recall from beyond it


def test_places_do_not_overlap_and_mix_parities() -> None:
    ds = RecallDataset(seq_len=256, vocab_size=64, num_pairs=16, num_queries=16, num_samples=50)
    parities = set()
    for i in range(len(ds)):
        item = ds[i]
        seq = torch.cat([item["input_ids"], item["targets"][-1:]])
        pos = ((seq >= ds.key0) & (seq < ds.val0)).nonzero().flatten()
        assert torch.all(pos[1:] - pos[:-1] >= 2)  # each k v place is whole, none overlaps another
        assert torch.all(seq[pos + 1] >= ds.val0)
        parities |= set((pos % 2).tolist())
    assert parities == {0, 1}  # no even-offset alignment for a dilated pattern to exploit or trip on
