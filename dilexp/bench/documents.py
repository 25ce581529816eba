"""``bench.docs``: packed documents in the bench (issue 18).

A document-length distribution, written on the command line as

    fixed:L          every document L tokens
    uniform:a-b      lengths drawn uniformly from [a, b]
    lognormal:mean   log-normal lengths with this mean (sigma 1, the heavy tail of real corpora)

fills every row of N tokens with documents (the last one cut at N). Each timed call gets a
fresh layout, as each training step gets a fresh batch, so a cache helps only within a call
(its layers); ``DocSteps`` times what building the layout costs in every call (the layout
object, plus the plan builds the caches count) against the whole call, and the "nodocs"
twin runs the same tokens without documents.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dilexp.errors import ConfigError
from dilexp.patterns.documents import DocumentLayout

KINDS = ("fixed", "uniform", "lognormal")
LOGNORMAL_SIGMA = 1.0
# Roles that run the main variant (with documents): their time compares with the nodocs twin's.
SAME_VARIANT = ("main", "compare_cache", "compare_memory")
NODOCS = "nodocs"
_SYNTAX = "write fixed:L, uniform:a-b or lognormal:mean (lengths in tokens)"


@dataclass(frozen=True)
class DocLengths:
    kind: str
    low: float  # fixed: L; uniform: a; lognormal: the mean
    high: float  # uniform: b; else = low

    @property
    def spec(self) -> str:
        if self.kind == "uniform":
            return f"uniform:{int(self.low)}-{int(self.high)}"
        return f"{self.kind}:{self.low:g}"

    def draw(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """``count`` document lengths (int64, >= 1)."""
        if self.kind == "fixed":
            return torch.full((count,), int(self.low), dtype=torch.int64)
        if self.kind == "uniform":
            return torch.randint(int(self.low), int(self.high) + 1, (count,), generator=gen)
        # E[exp(X)] = exp(mu + sigma^2 / 2) = mean.
        mu = math.log(self.low) - LOGNORMAL_SIGMA**2 / 2
        x = torch.randn(count, generator=gen, dtype=torch.float64) * LOGNORMAL_SIGMA + mu
        return torch.exp(x).round().clamp(min=1).to(torch.int64)

    def doc_ids(self, batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
        """(batch, n) per-token document ids: each row filled with drawn documents, the last cut at n."""
        rows = []
        for _ in range(batch):
            lengths = self.draw(max(1, n // max(1, int(self.low)) + 8), gen)
            while int(lengths.sum()) < n:
                lengths = torch.cat([lengths, self.draw(len(lengths), gen)])
            ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:n]
            rows.append(ids)
        return torch.stack(rows)


def parse_docs(value: Any) -> DocLengths | None:
    """``bench.docs`` checked: None (no documents) or a distribution; one ConfigError otherwise."""
    if value is None:
        return None
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError("bench.docs", value, _SYNTAX)
    kind, _, arg = value.partition(":")
    if kind not in KINDS:
        raise ConfigError("bench.docs", value, f"unknown distribution {kind!r}; {_SYNTAX}")
    try:
        if kind == "uniform":
            lo_s, sep, hi_s = arg.partition("-")
            if not sep:
                raise ValueError(arg)
            low, high = float(int(lo_s)), float(int(hi_s))
        elif kind == "fixed":
            low = high = float(int(arg))
        else:
            low = high = float(arg)
    except ValueError:
        raise ConfigError("bench.docs", value, _SYNTAX) from None
    if not (low >= 1 and high >= low and math.isfinite(high)):
        raise ConfigError("bench.docs", value, "lengths must be >= 1 (and a <= b for uniform)")
    return DocLengths(kind, low, high)


class DocSteps:
    """A timed unit over packed documents: call ``step(docs)`` with a fresh layout each call
    (layouts drawn ahead, cycled if the run asks for more), and keep the seconds spent in
    whole calls and in building the layout object (``DocumentLayout.from_doc_ids``, which the
    LM module does once per step)."""

    def __init__(self, step: Callable[[DocumentLayout | None], Any], ids: list[torch.Tensor] | None) -> None:
        self.step = step
        self.ids = ids
        self.calls = 0
        self.total_s = 0.0
        self.layout_s = 0.0
        self.doc_count = 0

    def __call__(self) -> Any:
        t0 = time.perf_counter()
        docs = None
        if self.ids is not None:
            docs = DocumentLayout.from_doc_ids(self.ids[self.calls % len(self.ids)])
            self.layout_s += time.perf_counter() - t0
            self.doc_count += docs.num_documents
        self.calls += 1
        try:
            return self.step(docs)
        finally:
            self.total_s += time.perf_counter() - t0


def doc_layouts(spec: DocLengths, batch: int, n: int, calls: int) -> list[torch.Tensor]:
    """``calls`` doc-id tensors (batch, n) for one case, the same for every candidate (seeded by n)."""
    gen = torch.Generator().manual_seed(10_000 + n)
    return [spec.doc_ids(batch, n, gen) for _ in range(calls)]


def doc_columns(role: str, fn: Any, build_s: float, medians: dict[str, float], median_s: float) -> dict[str, Any]:
    """A docs-mode row's figures: mean document length, layout build share of the call time
    (layout object + plan builds), and the call time against the same tokens without documents."""
    if not isinstance(fn, DocSteps) or fn.calls == 0:
        return {}
    row: dict[str, Any] = {}
    if fn.ids is not None:
        tokens = fn.ids[0].numel()
        row["docs_mean_len"] = tokens * fn.calls / max(1, fn.doc_count)
        row["docs_layout_ms"] = 1e3 * (fn.layout_s + build_s) / fn.calls
        row["docs_build_share"] = (fn.layout_s + build_s) / fn.total_s if fn.total_s > 0 else math.nan
        base = medians.get(NODOCS, math.nan)
        if role in SAME_VARIANT and math.isfinite(base) and median_s > 0:
            row["docs_vs_nodocs"] = median_s / base
    return row
