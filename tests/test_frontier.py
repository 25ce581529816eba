"""dilexp.compare --frontier: the Pareto front on points with known answers, and the command on run
records written here (medians over seeds, skipped configurations, the missing-metric error)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_compare import _summary

from dilexp.compare import main
from dilexp.frontier import dominates, pareto_front

# -- the front on fixture points ----------------------------------------------------------------


@pytest.mark.parametrize(("points", "front"), [
    ([], []),
    ([(3.0, 0.5)], [0]),
    # (1, 1) is beaten by (2, 2) on both axes; the other three trade x for y.
    ([(1.0, 3.0), (1.0, 1.0), (2.0, 2.0), (3.0, 1.0)], [0, 2, 3]),
    # A tie on one axis and worse on the other is dominated: same x, lower y; same y, lower x.
    ([(1.0, 1.0), (1.0, 2.0)], [1]),
    ([(2.0, 5.0), (1.0, 5.0)], [0]),
    # Equal points do not beat each other: both stay, in input order.
    ([(2.0, 2.0), (1.0, 1.0), (2.0, 2.0)], [0, 2]),
    # One point best on both axes takes the whole front.
    ([(1.0, 1.0), (5.0, 9.0), (4.0, 8.0), (5.0, 8.0)], [1]),
    # The result runs along x whatever the input order.
    ([(9.0, 1.0), (1.0, 9.0), (5.0, 5.0)], [1, 2, 0]),
])
def test_pareto_front_known_answers(points: list[tuple[float, float]], front: list[int]) -> None:
    assert pareto_front(points) == front


def test_pareto_front_lower_is_better() -> None:
    # x = tokens/s (higher better), y = loss (lower better): (3, 1) beats (2, 2) and (1, 3).
    pts = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0), (3.0, 2.5)]
    assert pareto_front(pts, maximize=(True, False)) == [2]
    assert pareto_front(pts, maximize=(False, False)) == [0, 1, 2]
    assert pareto_front(pts, maximize=(False, True)) == [0]  # lowest x and highest y at once
    assert dominates((3.0, 1.0), (2.0, 2.0), (True, False))
    assert not dominates((2.0, 2.0), (2.0, 2.0))


def test_pareto_front_refuses_non_finite() -> None:
    with pytest.raises(ValueError, match="point 1"):
        pareto_front([(1.0, 1.0), (float("nan"), 2.0)])


def test_pareto_front_matches_its_definition_on_random_points() -> None:
    rng = random.Random(0)
    for _ in range(200):
        # Few distinct values: plenty of ties and duplicates.
        pts = [(float(rng.randint(0, 5)), float(rng.randint(0, 5))) for _ in range(rng.randint(1, 12))]
        maximize = (rng.random() < 0.5, rng.random() < 0.5)
        front = pareto_front(pts, maximize)
        for i, p in enumerate(pts):
            beaten = any(dominates(q, p, maximize) for q in pts)
            assert (i in front) != beaten, (pts, maximize, i)
        assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)


# -- the command ---------------------------------------------------------------------------------

# (attention, tokens/s per seed, val/acc per seed): medians 1000/0.90, 5000/0.80, 20000/0.50, 4000/0.70.
CONFIGS = [
    ("sdpa", (1000.0, 900.0, 1100.0), (0.90, 0.89, 0.93)),
    ("dilated", (5000.0, 5200.0, 4800.0), (0.80, 0.81, 0.30)),   # an outlier seed: the median keeps it on the front
    ("ring_v3", (20000.0, 19000.0, 21000.0), (0.50, 0.52, 0.49)),
    ("improved", (4000.0, 4100.0, 3900.0), (0.70, 0.99, 0.69)),  # dominated by dilated (its mean would not be)
]
FRONT = ["attention=sdpa", "attention=dilated", "attention=ring_v3"]


def _frontier_sweep(root: Path) -> Path:
    i = 0
    for attention, tps, acc in CONFIGS:
        for seed, (t, a) in enumerate(zip(tps, acc, strict=True), start=1):
            _summary(root / str(i), choices={"attention": attention, "cache": "local", "task": "train"},
                     overrides=[f"attention={attention}", f"seed={seed}", "task.max_steps=10"],
                     metrics={"perf/tokens_per_s_median": t, "val/acc": a, "val/loss": 1.0 - a})
            i += 1
    # Completed without val/acc (say, no validation ran): skipped with a note.
    _summary(root / "nv", choices={"attention": "flex", "cache": "local", "task": "train"},
             overrides=["attention=flex", "task.max_steps=10"], metrics={"perf/tokens_per_s_median": 9e9})
    # Not completed, or not training: never points.
    _summary(root / "failed", status="failed", choices={"attention": "ring_v2", "cache": "local", "task": "train"},
             overrides=["attention=ring_v2"], error="RuntimeError: boom")
    _summary(root / "bench", task="bench", choices={"attention": "sdpa", "task": "bench"},
             overrides=["attention=sdpa", "task=bench"], metrics={"val/acc": 1.0}, bench=[])
    return root


def _front_rows(md: str) -> dict[str, list[str]]:
    rows = [line.strip("| ").split(" | ") for line in md.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}  # rows[0]: the header


def test_frontier_command_prints_the_front_and_saves_the_plot(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _frontier_sweep(tmp_path / "sweep")
    png = tmp_path / "plots" / "front.png"
    assert main([str(sweep), "--frontier", "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert all(len(line) <= 80 for line in out.splitlines()), out
    for label in FRONT:
        assert label in out
    assert "improved" not in out and "flex" not in out and "ring_v2" not in out
    # Only the attention choice varies: cache and task.max_steps are no part of the labels.
    assert "cache" not in out and "max_steps" not in out
    assert "3 of 4 configurations on the front" in out
    assert "skipped attention=flex: no val/acc" in err
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same front as markdown: exactly the expected configurations, along x, at the seeds' medians.
    md = tmp_path / "front.md"
    assert main([str(sweep), "--frontier", "--plot", str(png), "--out", str(md)]) == 0
    rows = _front_rows(md.read_text())
    assert list(rows) == FRONT
    assert rows["attention=dilated"] == ["5,000", "0.8", "3"]  # one number format: thousands separated
    assert rows["attention=sdpa"] == ["1,000", "0.9", "3"]


def test_frontier_axes_directions_and_default_plot_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _frontier_sweep(tmp_path / "sweep")
    monkeypatch.chdir(tmp_path)
    md = tmp_path / "loss.md"
    # val/loss = 1 - val/acc: lower is better, so the same front; `loss` finds the key as --plot does.
    assert main([str(sweep), "--frontier", "--y", "loss", "--minimize", "y", "--out", str(md)]) == 0
    assert list(_front_rows(md.read_text())) == FRONT
    assert (tmp_path / "frontier.png").stat().st_size > 0
    # Higher loss "better": the fastest run is best on both axes.
    assert main([str(sweep), "--frontier", "--y", "val/loss", "--out", str(md), "--where", "attention=sdpa"]) == 0
    assert list(_front_rows(md.read_text())) == ["the one configuration"]
    assert main([str(sweep), "--frontier", "--y", "val/loss", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("configuration,attention,perf/tokens_per_s_median,")
    assert [line.split(",")[0] for line in lines[1:]] == ["attention=ring_v3"]


def test_missing_metric_is_one_message_and_exit_2(tmp_path: Path, dilexp_cli) -> None:
    sweep = tmp_path / "sweep"
    for i, attention in enumerate(("sdpa", "dilated")):
        _summary(sweep / str(i), choices={"attention": attention}, overrides=[f"attention={attention}"],
                 metrics={"perf/tokens_per_s_median": 100.0 * (i + 1), "val/loss": 2.0})
    # The real command: the exit status and stderr a user sees.
    res = dilexp_cli([str(sweep), "--frontier", "--plot", str(tmp_path / "f.png")], cwd=tmp_path,
                     module="dilexp.compare", timeout=120)
    assert res.returncode == 2, res.stderr
    assert "no completed train run has val/acc" in res.stderr
    assert "--y" in res.stderr and "val/loss" in res.stderr  # how to pick another, and what there is
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "f.png").exists()


def test_frontier_without_completed_train_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _summary(tmp_path / "s" / "0", status="failed", choices={"attention": "sdpa"}, overrides=["attention=sdpa"])
    assert main([str(tmp_path / "s"), "--frontier"]) == 2
    assert "no completed train run" in capsys.readouterr().err
