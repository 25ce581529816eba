"""``task=bench bench.docs=...`` (issue 18): the distribution syntax, checked before any work,
the layouts it draws, and the rows it adds (build share, time against the same tokens without
documents)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dilexp.bench.documents import DocLengths, parse_docs
from dilexp.errors import ConfigError
from dilexp.patterns.documents import DocumentLayout
from dilexp.tasks.bench import PreparedBench
from tests.test_bench import run_in_process


@pytest.mark.parametrize("value", ["fixed", "fixed:0", "fixed:x", "uniform:5", "uniform:9-3", "uniform:a-b",
                                   "lognormal:0", "lognormal:-3", "poisson:10", 7])
def test_bad_distribution_names_bench_docs(compose_cfg, value: object) -> None:
    cfg = compose_cfg(["task=bench", "attention=improved", f"bench.docs={value}"])
    with pytest.raises(ConfigError) as info:
        PreparedBench(cfg)
    assert info.value.field == "bench.docs" and "\n" not in str(info.value)


def test_docs_refuse_the_cache_target(compose_cfg) -> None:
    cfg = compose_cfg(["task=bench", "bench.target=cache", "bench.docs=fixed:64"])
    with pytest.raises(ConfigError, match="bench.docs"):
        PreparedBench(cfg)


@pytest.mark.parametrize("spec", ["fixed:37", "uniform:5-60", "lognormal:40"])
def test_drawn_layouts_fill_rows_with_the_distribution(spec: str) -> None:
    dist = parse_docs(spec)
    assert isinstance(dist, DocLengths) and dist.spec == spec
    gen = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(20):
        ids = dist.doc_ids(2, 4096, gen)
        assert ids.shape == (2, 4096)
        lay = DocumentLayout.from_doc_ids(ids)
        for row in range(2):
            lengths += lay.lengths(row)[:-1]  # the last document of a row is cut at N
    mean = sum(lengths) / len(lengths)
    if spec.startswith("fixed"):
        assert set(lengths) == {37}
    elif spec.startswith("uniform"):
        assert min(lengths) >= 5 and max(lengths) <= 60 and abs(mean - 32.5) < 2
    else:
        assert abs(mean - 40) < 4 and max(lengths) > 3 * mean  # a heavy tail


def test_bench_rows_report_build_share_and_nodocs(compose_cfg, tmp_path: Path) -> None:
    result = run_in_process(compose_cfg, tmp_path, ["attention=improved", "attention.segment_lengths=[16,32]",
                                                    "attention.dilation_rates=[1,2]", "bench.docs=uniform:10-40",
                                                    "cache=local", "bench.compare_cache=none"])
    rows = result["bench"]
    roles = {(r["role"], r["seq_len"]) for r in rows if r.get("docs") == "uniform:10-40"}
    assert {("main", 96), ("nodocs", 96), ("compare_cache", 160), ("sdpa", 160)} <= roles
    for r in rows:
        if r.get("role") in ("main", "compare_cache"):
            assert r["status"] == "ok", r
            assert 0 < r["docs_build_share"] < 1 and r["docs_layout_ms"] > 0 and r["docs_vs_nodocs"] > 0
            assert 10 <= r["docs_mean_len"] <= 40
        if r.get("role") == "nodocs":
            assert "docs_build_share" not in r and r["status"] == "ok"
    # Each call draws a new layout: without a cache every call builds, with one once per layout.
    main = next(r for r in rows if r.get("role") == "main" and r["seq_len"] == 96)
    none = next(r for r in rows if r.get("role") == "compare_cache" and r["seq_len"] == 96)
    assert none["cache/misses"] >= main["cache/misses"] >= 1
    assert math.isfinite(main["docs_build_share"])
