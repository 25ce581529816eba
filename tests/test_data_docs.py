"""data=docs (issue 18): a corpus of documents packed into sequences with an end-of-document
token, document ids in every batch, the model's per-document positions, and the CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dilexp.attention import build
from dilexp.data.docs import DocumentCorpus, PackedDocuments
from dilexp.errors import ConfigError
from dilexp.main import _prepare
from dilexp.models.gpt import GPT, GPTConfig
from dilexp.patterns.documents import DocumentLayout


def make_folder(root: Path, lengths: list[int], seed: int = 0) -> Path:
    """A corpus folder: document i is ``lengths[i]`` letters (all of one letter per document,
    so a token tells which document it came from)."""
    folder = root / "corpus"
    folder.mkdir()
    for i, n in enumerate(lengths):
        (folder / f"doc{i:03d}.txt").write_text(chr(ord("a") + i % 26) * n)
    (folder / ".hidden").write_text("never read")
    return folder


def test_packing_eod_doc_ids_and_long_documents_split(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [5, 3, 40, 2, 7, 11, 1, 9])
    corpus = DocumentCorpus(folder)
    assert corpus.vocab_size == 257 and corpus.eod == 256 and len(corpus.docs) == 8  # .hidden skipped
    seq = 16
    ds = PackedDocuments(corpus.docs, corpus.eod, seq_len=seq, num_samples=20, seed=1)
    total = sum(len(d) + 1 for d in corpus.docs)
    assert ds.windows == (total - 1) // seq
    seen_long_piece = False
    for i in range(ds.windows):
        item = ds[i]
        ids, tgt, mask, doc = item["input_ids"], item["targets"], item["loss_mask"], item["doc_ids"]
        assert ids.shape == tgt.shape == mask.shape == doc.shape == (seq,)
        assert doc[0] == 0 and bool((doc.diff() >= 0).all()) and bool((doc.diff() <= 1).all())
        # a new document starts right after an end-of-document token, and only there
        starts = (doc.diff() == 1).nonzero().squeeze(1) + 1
        assert bool((ids[starts - 1] == corpus.eod).all())
        assert int((ids[:-1] == corpus.eod).sum()) == len(starts)
        # within a document all letters are the same; the EOD's target (next document) is masked
        for d in doc.unique():
            letters = ids[(doc == d) & (ids != corpus.eod)]
            assert letters.unique().numel() <= 1
        assert not bool(mask[ids == corpus.eod].any())
        assert bool(mask[ids != corpus.eod].all())
        seen_long_piece |= bool((ids == ord("c")).sum() == seq)  # a whole window inside the 40-letter document
        layout = DocumentLayout.from_doc_ids(doc[None])
        assert layout.num_documents == int(doc[-1]) + 1
    assert seen_long_piece


def test_deterministic_per_seed(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [13, 21, 8, 30, 5, 17, 9, 12])
    corpus = DocumentCorpus(folder)
    a = [PackedDocuments(corpus.docs, corpus.eod, 8, 30, seed=4)[i]["input_ids"] for i in range(30)]
    b = [PackedDocuments(corpus.docs, corpus.eod, 8, 30, seed=4)[i]["input_ids"] for i in range(30)]
    c = [PackedDocuments(corpus.docs, corpus.eod, 8, 30, seed=5)[i]["input_ids"] for i in range(30)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert corpus.split(0.25, seed=4) == corpus.split(0.25, seed=4)
    train, val = corpus.split(0.25, seed=4)
    assert len(val) == 2 and len(train) == 6


def test_jsonl_field_and_char_tokens(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["héllo", "", "world"])) + "\n")
    corpus = DocumentCorpus(path, field="body", tokenizer="char")
    assert len(corpus.docs) == 2  # the empty document is dropped
    assert corpus.chars == sorted(set("hélloworld")) and corpus.eod == len(corpus.chars)
    with pytest.raises(ConfigError) as err:
        DocumentCorpus(path, field="text")
    assert err.value.field == "data.field"


@pytest.mark.parametrize("kind", ["missing", "empty-folder", "empty-docs", "not-jsonl", "unset"])
def test_bad_corpus_names_data_path(tmp_path: Path, kind: str) -> None:
    path: Path | None = tmp_path / "x"
    if kind == "empty-folder":
        path.mkdir()
    elif kind == "empty-docs":
        path.mkdir()
        (path / "a.txt").write_text("")
    elif kind == "not-jsonl":
        path.write_text("plain text, not JSON\n")
    elif kind == "unset":
        path = None
    with pytest.raises(ConfigError) as err:
        DocumentCorpus(path)
    assert err.value.field == "data.path"


def test_unreadable_corpus_names_data_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_folder(tmp_path, [4, 4])

    def refuse(self: Path) -> bytes:  # as chmod 0 would, also for root
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError) as err:
        DocumentCorpus(folder)
    assert err.value.field == "data.path" and "unreadable" in str(err.value)


def test_prepare_builds_docs_batches(compose_cfg, tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [30, 50, 20, 70, 40, 25, 60, 35, 45, 55])
    cfg = compose_cfg(["data=docs", f"data.path={folder}", "data.seq_len=16", "model=small", "attention=sdpa"])
    prepared = _prepare(cfg)
    batch = next(iter(prepared.data.train_dataloader()))
    assert batch["doc_ids"].shape == batch["input_ids"].shape
    assert prepared.data.vocab_size == 257


def test_missing_corpus_cli_one_line_exit_2_no_folder(dilexp_cli, tmp_path: Path) -> None:
    proc = dilexp_cli(["data=docs", "data.path=missing_dir", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                      timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("dilexp: config error:")]
    assert len(errors) == 1 and "data.path" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_model_with_documents_equals_each_document_alone() -> None:
    """Packed with a layout, every document's logits are those of the document run alone:
    attention stays inside it and rotary positions restart at its start."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=20, n_layer=2, n_head=2, d_model=16)
    model = GPT(cfg, lambda: build("sdpa", num_heads=2, head_dim=8)).double().eval()
    layout = DocumentLayout(12, ((0, 5, 6), (0, 9)))
    idx = torch.randint(0, 20, (2, 12))
    with torch.no_grad():
        packed = model(idx, docs=layout)
        for r in range(2):
            for a, b in layout.spans(r):
                alone = model(idx[r:r + 1, a:b])
                assert (packed[r:r + 1, a:b] - alone).abs().max().item() < 1e-10
        # without the layout the later documents see earlier ones: different logits
        assert (model(idx) - packed).abs().max().item() > 1e-6


def test_train_from_the_readme_command(dilexp_cli, tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [(37 * i) % 150 + 10 for i in range(30)])
    proc = dilexp_cli(["data=docs", f"data.path={folder}", "attention=improved", "model=small", "data.seq_len=64",
                       "task.max_steps=4", "task.val_every_n_steps=2", "task.log_every_n_steps=2", "logger=csv",
                       f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["choices"]["data"] == "docs"
    assert summary["metrics"]["train/steps"] == 4


def test_documents_under_cp_need_a_document_path(compose_cfg, tmp_path: Path) -> None:
    """The generic path slices whole documents, which a shard does not hold: refused before any
    work unless the variant has a document path of its own."""
    from dilexp.attention.base import Attention
    from dilexp.attention.registry import _REGISTRY

    folder = make_folder(tmp_path, [30, 50, 20, 70, 40, 25, 60, 35, 45, 55])
    cfg = compose_cfg(["data=docs", f"data.path={folder}", "data.seq_len=16", "model=small", "attention=ring_v2",
                       "hardware=cp", "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true"])
    if _REGISTRY["ring_v2"].forward_documents is Attention.forward_documents:
        with pytest.raises(ConfigError) as err:
            _prepare(cfg)
        assert err.value.field == "data.name"
    else:
        _prepare(cfg)
