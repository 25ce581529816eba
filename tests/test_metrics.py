"""One metrics vocabulary: bench rows, training telemetry, sweep.json and compare use the same names;
records written with the old bench names are still read."""

from __future__ import annotations

import json
from pathlib import Path

from dilexp.bench.stats import cache_columns, pool_columns
from dilexp.compare import find_runs, make_tables
from dilexp.metrics import COUNTER, LEVEL, METRICS, canonical, canonical_row, kind, label
from dilexp.sweep_table import HEADLINE


def test_bench_rows_and_training_share_names() -> None:
    before = {"hits": 10.0, "misses": 2.0, "hit_rate": 10 / 12, "entries": 3.0}
    after = {"hits": 13.0, "misses": 3.0, "hit_rate": 13 / 16, "entries": 4.0}
    cols = cache_columns(before, after)
    # Counters grow over the case; levels stand as they are; the rate is the case's own.
    assert cols == {"cache/hits": 3.0, "cache/misses": 1.0, "cache/hit_rate": 0.75, "cache/entries": 4.0}
    pool = pool_columns({"requests": 5.0, "reuses": 1.0, "reuse_rate": 0.2, "pooled_bytes": 64.0},
                        {"requests": 9.0, "reuses": 4.0, "reuse_rate": 4 / 9, "pooled_bytes": 32.0})
    assert pool == {"memory/pool_requests": 4.0, "memory/pool_reuses": 3.0, "memory/pool_reuse_rate": 0.75,
                    "memory/pool_pooled_bytes": 32.0}
    assert kind("cache/hits") == COUNTER and kind("cache/entries") == LEVEL and kind("memory/pool_requests") == COUNTER
    # Every headline figure of sweep.json has a label of its own.
    assert all(k in METRICS and label(k) != k for k in HEADLINE)


def test_old_bench_names_map_on_read() -> None:
    assert canonical("cache_hit_rate") == "cache/hit_rate" and canonical("pool_requests") == "memory/pool_requests"
    # Settings and bench-only figures that merely start alike are not statistics.
    for name in ("cache_strategy", "cache_held_mb", "pool_idle_mb", "median_ms"):
        assert canonical(name) == name
    assert canonical_row({"cache_hits": 1.0, "cache/hits": 2.0, "variant": "x"}) == {"cache/hits": 2.0, "variant": "x"}
    assert label("cache_hit_rate") == label("cache/hit_rate") == "cache hit"
    assert label("perf/tflops") == "TFLOP/s (model)" and label("perf/mfu") == "MFU (model)"


def test_compare_reads_a_record_with_the_old_names(tmp_path: Path) -> None:
    rows = [{"target": "attention", "variant": v, "role": "main", "seq_len": 256, "status": "ok", "median_ms": ms,
             "cache_hit_rate": rate} for v, ms, rate in (("dilated", 2.0, 0.5), ("improved", 1.0, 0.75))]
    for i, row in enumerate(rows):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(
            {"status": "completed", "task": "bench", "choices": {"attention": row["variant"]}, "overrides": [],
             "metrics": {}, "bench": [row]}))
    (table,) = make_tables(find_runs([tmp_path]), None)
    assert "cache/hit_rate" in table.metrics
    assert sorted(r.values["cache/hit_rate"] for r in table.rows) == [0.5, 0.75]
    # A user asking for the old name gets the same column.
    (table,) = make_tables(find_runs([tmp_path]), ["cache_hit_rate"])
    assert table.metrics == ["cache/hit_rate"]
