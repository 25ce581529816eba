"""Preflight: refuse a job whose estimated peak memory exceeds what the machine has (issue 14).

An order-of-magnitude estimate from the config alone, made before anything is built, so
``data.seq_len=100000000`` is refused in seconds instead of growing until the OOM killer
ends it. ``task.preflight=false`` skips it. The estimate, per process, in bytes:

    parameters  P = V*d + L*(4 + 2*m)*d^2        (tied embedding, qkv+proj, MLP; norms ignored)
    train state 16 * P                           (fp32 weights, grads, Adam's two moments)
    activations L * B * N * (16 + 2*m) * d * 4   (what autograd keeps per layer for backward: norms,
                                                  q/k/v and the variant's copies of them, outputs, MLP)
              + 3 * B * N * V * 4                (logits, their softmax and gradient)
    attention   per layer, the score matrices the variant materialises (4 bytes each; twice:
                the scores and their softmax/gradient), B * H * ... :
                  sdpa          N^2 per layer on the math path (float64: no fused kernel keeps the
                                full matrix for backward); the fused kernels torch picks on CPU
                                and GPU for 32/16-bit keep O(N) (counted in activations), so 0
                  dilated, improved, flex: sum over branches of h_b * N * s / r^2, s = min(w, N)
                                (N/s segments, each (s/r)^2 scores; h_b heads per branch)
                  ring_v2/v3    the same for one layer only, divided by `chunks` (the backward
                                recomputes; only output and log-sum-exp are kept)
                  block_sparse  (N/b) * k * b^2, k = key blocks a query block visits

with V the vocabulary, d = model.d_model, L = model.n_layer, m = model.mlp_ratio, H heads,
B the batch, N the sequence length (per rank's shard under hardware=cp). Eval keeps no
optimizer state nor per-layer activations (forward only); task=check holds float64 dense
references (3 * B * H * N^2 * 8); task=bench is sized by its largest case. The estimate
is compared with MemAvailable (/proc/meminfo) times the processes on this host, or with
the GPU's free memory (torch.cuda.mem_get_info).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from dilexp.errors import ConfigError

F32 = 4
GIB = 1 << 30


@dataclass
class Estimate:
    """Peak bytes per process, by part, and the setting that sizes the largest part."""

    parts: dict[str, float] = field(default_factory=dict)
    field: str = "data.seq_len"
    value: Any = None

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{k} {_gib(v)}" for k, v in big if v >= 0.01 * self.total)


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


def _seg_scores(att: DictConfig, n: int, heads: int) -> float:
    """Scores the dilated pattern materialises for one layer and one sequence (all heads)."""
    seg = [int(w) for w in att.get("segment_lengths", [n])]
    rates = [int(r) for r in att.get("dilation_rates", [1] * len(seg))]
    per_branch_heads = heads if str(att.get("heads", "grouped")) == "all" else max(1, heads // max(1, len(seg)))
    total = 0.0
    for w, r in zip(seg, rates, strict=False):
        s = min(w, n)
        total += per_branch_heads * n * s / (r * r)
    return total


def math_path(cfg: DictConfig) -> bool:
    """True when SDPA falls back to its math path (materialised scores): float64 has no fused kernel.
    (Measured, torch 2.x on CPU: fp32 causal SDPA fwd+bwd at N=8192, 4 heads peaks at 0.27 GiB RSS,
    not the 1 GiB its score matrix alone would take.)"""
    return str(cfg.hardware.get("precision", "32-true")) in ("64", "64-true")


def attention_scores(att: DictConfig, n: int, heads: int, layers: int, dense: bool) -> float:
    """Bytes of attention score buffers of the variant for one sequence of length ``n``."""
    name = str(att.get("name", "sdpa"))
    if name in ("dilated", "improved", "flex"):
        return 2 * F32 * layers * _seg_scores(att, n, heads)
    if name in ("ring_v2", "ring_v3"):
        return 2 * F32 * _seg_scores(att, n, heads) / max(1, int(att.get("chunks", 1)))
    if name == "block_sparse":
        b = int(att.get("block_size", 64))
        nb = max(1, -(-n // b))
        dil = int(att.get("dilation", 0) or 0)
        k = min(nb, 2 * int(att.get("local_blocks", 1)) + 1 + int(att.get("global_blocks", 1))
                + (nb // dil if dil else 0))
        return 2 * F32 * layers * heads * nb * k * b * b
    # sdpa (and variants this module does not know): the dense matrix only on the math path.
    return 2 * F32 * layers * heads * float(n) * n if dense else 0.0


def _ranks_here(hw: DictConfig) -> int:
    devices = hw.get("devices", 1)
    if isinstance(devices, int):
        return max(1, devices)
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        return max(1, len(devices))
    return 1


def estimate(cfg: DictConfig) -> Estimate:
    """The job's estimated peak memory per process (see the module docstring for the formula)."""
    task = str(cfg.task.get("name", "train"))
    hw = cfg.hardware
    dense = math_path(cfg)
    model, data, att = cfg.get("model"), cfg.get("data"), cfg.attention
    L, H, d = int(model.n_layer), int(model.n_head), int(model.d_model)
    m = int(model.get("mlp_ratio", 4))
    V = int(data.get("vocab_size", 256) or 256)
    n = int(data.seq_len)
    est = Estimate(field="data.seq_len", value=n)
    if task == "bench":
        bench = cfg.get("bench") or {}
        lens = [int(x) for x in bench.get("seq_lens", [n])] or [n]
        n = max(lens)
        est.field, est.value = "bench.seq_lens", list(lens)
        if str(bench.get("target", "attention")) == "attention":
            B, Hb, hd = int(bench.get("batch", 1)), int(bench.get("heads", 8)), int(bench.get("head_dim", 64))
            # q, k, v, out and their gradients, for the variant and its comparison builds.
            est.parts["tensors"] = 8 * B * n * Hb * hd * F32 * 2
            dense = dense or str(bench.get("dtype", "float32")) == "float64"
            scores = attention_scores(att, n, Hb, 1, dense)
            if bench.get("baseline_sdpa", True):
                scores = max(scores, attention_scores(DictConfig({"name": "sdpa"}), n, Hb, 1, dense))
            est.parts["attention"] = B * scores
            return est
        if str(bench.get("target")) != "model":
            return est  # the cache target holds patterns only (bounded by the cache's own limits)
        V = int(bench.get("vocab_size", 256))
        B = 1
    else:
        B = int(cfg.task.get("batch_size", 1))
    if hw.get("context_parallel", False):
        n = -(-n // _ranks_here(hw))  # each rank holds its shard
    params = V * d + L * (4 + 2 * m) * d * d
    if task == "check":
        hd = d // max(1, H)
        bc = int(cfg.task.get("batch_size", 2))
        est.parts["tensors"] = 16 * bc * n * H * hd * 8
        est.parts["dense reference"] = 3 * bc * H * float(n) * n * 8
        est.parts["attention"] = bc * attention_scores(att, n, H, 1, dense)
        return est
    if task == "eval":
        passkey = cfg.task.get("passkey") or {}
        factors = [float(f) for f in (passkey.get("length_factors") or [1])] if passkey.get("enabled") else [1]
        lengths = [int(x) for x in (passkey.get("lengths") or [])] or [int(n * f) for f in factors]
        n = max([n, *lengths])
        est.parts["parameters"] = params * F32
        est.parts["activations"] = B * n * ((16 + 2 * m) * d + 3 * V) * F32
        est.parts["attention"] = B * attention_scores(att, n, H, 1, dense)
        return est
    est.parts["parameters + optimizer"] = 16 * params
    est.parts["activations"] = B * n * (L * (16 + 2 * m) * d + 3 * V) * F32
    est.parts["attention"] = B * attention_scores(att, n, H, L, dense)
    if est.parts["parameters + optimizer"] > est.parts["activations"] + est.parts["attention"]:
        est.field, est.value = "model.d_model", d
    return est


def host_available() -> float | None:
    """Bytes of host memory available to new work (MemAvailable), or None where unknown."""
    try:
        import psutil  # type: ignore[import-not-found]

        return float(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available(cfg: DictConfig) -> tuple[float | None, str]:
    """(bytes one process may use, where they are) for the configured accelerator."""
    hw = cfg.hardware
    if str(hw.get("accelerator", "cpu")) in ("gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return float(free), "free on the GPU"
        return None, ""  # no GPU: the build step says so, naming hardware.accelerator
    host = host_available()
    if host is None:
        return None, ""
    ranks = _ranks_here(hw) if os.environ.get("LOCAL_RANK") is None else 1
    # Ranks on one host share its memory; a rank started by the launcher sees the others already running.
    return host / ranks, "of host memory available" + (f" per rank ({ranks} ranks)" if ranks > 1 else "")


def preflight(cfg: DictConfig) -> Estimate | None:
    """Raise a ConfigError when the job's estimated peak exceeds the memory available.

    Returns the estimate (None when skipped with ``task.preflight=false`` or not measurable).
    """
    if cfg.task.get("preflight", True) is False:
        return None
    try:
        est = estimate(cfg)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None  # a config the estimate does not understand: the build step's checks decide
    have, where = available(cfg)
    if have is None or est.total <= have:
        return est
    raise ConfigError(est.field, est.value,
                      f"the job needs about {_gib(est.total)} at peak ({est.describe()}), more than the "
                      f"{_gib(have)} {where}; make it smaller, or set task.preflight=false to run anyway")
