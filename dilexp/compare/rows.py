"""Table rows: a run's records grouped by configuration (and bench case), over their repeats."""

from __future__ import annotations

import fnmatch
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dilexp.compare.runs import CASE_KEYS, RAW_SAMPLES, Run, _num
from dilexp.metrics import canonical, canonical_row


@dataclass
class _Keyed:
    identity: dict[str, str]
    status: str


@dataclass
class Row(_Keyed):
    """One table row: a configuration (and a bench case), over its repeats."""

    values: dict[str, float]
    samples: dict[str, list[float]]
    runs: list[str]
    n: int
    error: str | None = None
    ratio: float | None = None
    ci: tuple[float, float] | None = None
    note: str = ""


@dataclass
class _Record(_Keyed):
    metrics: dict[str, Any]
    raw: dict[str, list[float]]
    run: str
    error: str | None
    measured: bool  # its figures count (a completed run, or a bench case timed before its job died)


def applies(metrics: dict[str, Any], name: str) -> bool:
    """False for a figure the configuration does not have although its record holds a number:
    a hit rate with no lookups at all (sdpa, cache=none) is written as 0 but means nothing."""
    if name.endswith("hit_rate"):
        prefix = name[: -len("hit_rate")]
        hits, misses = _num(metrics.get(prefix + "hits")), _num(metrics.get(prefix + "misses"))
        if hits is not None and misses is not None and hits + misses == 0:
            return False
    return True



def _records(runs: list[Run], kind: str, bench_rows: str) -> list[_Record]:
    out: list[_Record] = []
    for run in runs:
        is_bench = run.task == "bench" or bool(run.bench)
        if (kind == "bench") != is_bench:
            continue
        done = run.status == "completed"
        if not is_bench or not run.bench:
            out.append(_Record(dict(run.settings), run.status, run.metrics, {}, run.path, run.error, done))
            continue
        for row in map(canonical_row, run.bench):  # records from before bench rows took training's names
            if bench_rows == "main" and row.get("role") not in (None, "main"):
                continue
            case = {k: str(row[k]) for k in CASE_KEYS if row.get(k) is not None}
            ok = row.get("status", "ok") == "ok"
            # A bench job writes its rows case by case: a job that died later still timed these.
            status = ("completed" if done else f"partial ({run.status})") if ok else str(row.get("status"))
            raw = {m: [float(x) for x in row[src] if _num(x) is not None]
                   for m, src in RAW_SAMPLES.items() if isinstance(row.get(src), list)}
            out.append(_Record({**run.settings, **case}, status, row, raw, run.path,
                               row.get("error") or (None if done else run.error), ok))
    return out


def build_rows(runs: list[Run], kind: str, metrics: list[str], bench_rows: str = "main") -> list[Row]:
    groups: dict[tuple[tuple[str, str], ...], list[_Record]] = {}
    for rec in _records(runs, kind, bench_rows):
        groups.setdefault(tuple(sorted(rec.identity.items())), []).append(rec)
    rows = []
    for key, recs in groups.items():
        statuses = [r.status for r in recs]
        status = statuses[0] if len(set(statuses)) == 1 else ", ".join(
            f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
        ok = [r for r in recs if r.measured]
        values: dict[str, float] = {}
        samples: dict[str, list[float]] = {}
        for name in metrics:
            per_run = [v for r in ok if (v := _num(r.metrics.get(name))) is not None and applies(r.metrics, name)]
            if not per_run:
                continue
            values[name] = statistics.median(per_run)
            pooled = [x for r in ok for x in r.raw.get(name, [])]
            # Raw repeats of a bench case when there are some; across runs, the per-run figures.
            if len(pooled) >= 2:
                samples[name] = pooled
            elif len(per_run) >= 2:
                samples[name] = per_run
        errors = [r.error for r in recs if r.error]
        rows.append(Row(dict(key), status, values, samples, [r.run for r in recs], len(recs),
                        error=str(errors[0]) if errors else None))
    return rows




def _sort_key(value: str) -> tuple[int, float, str]:
    v = _num(value)
    return (0, v, "") if v is not None else (1, 0.0, value)


def _natural_key(text: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def expand_metrics(specs: Sequence[str], runs: list[Run], kind: str, bench_rows: str) -> list[str]:
    """One metric key per column from specs: ``a|b`` is a where any run has it, else b;
    ``memory/peak_*`` expands to every matching key the runs have."""
    available: set[str] = set()
    for rec in _records(runs, kind, bench_rows):
        available.update(k for k, v in rec.metrics.items() if _num(v) is not None)
    out: list[str] = []
    for spec in specs:
        alts = [canonical(a.strip()) for a in spec.split("|") if a.strip()]
        if len(alts) == 1 and any(ch in alts[0] for ch in "*?["):
            # Natural order: val/acc_dist/2-3 before val/acc_dist/16-31.
            matched = sorted(fnmatch.filter(available, alts[0]), key=_natural_key)
            out.extend(m for m in matched if m not in out)
        elif alts:
            name = next((a for a in alts if a in available), alts[0])
            if name not in out:
                out.append(name)
    return out


def varying_keys(rows: list[Row]) -> list[str]:
    """Settings that differ between rows, without columns that repeat an earlier one."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r.identity if k not in keys)
    varying = [k for k in keys if len({r.identity.get(k) for r in rows}) > 1]
    order = {k: i for i, k in enumerate(CASE_KEYS)}
    # Config settings first, then the bench case in its natural order.
    varying.sort(key=lambda k: (k in order, order.get(k, 0)))
    out: list[str] = []
    for k in varying:
        column = [r.identity.get(k) for r in rows]
        if any(column == [r.identity.get(j) for r in rows] for j in out):
            continue  # e.g. a bench row's variant is the job's attention choice
        out.append(k)
    return out


def _aliases(rows: list[Row], key: str) -> set[str]:
    """Keys that move one-to-one with ``key`` (bench ``variant`` with ``attention``)."""
    out = set()
    keys = {k for r in rows for k in r.identity}
    for other in keys - {key}:
        pairs = {(r.identity.get(key), r.identity.get(other)) for r in rows}
        if len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs}):
            out.add(other)
    return out

