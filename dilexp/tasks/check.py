"""task=check: a certificate that the configured variant computes DESIGN's function (section 3)
at the configured shapes, dtype and world size.

The composed variant runs forward and backward on seeded random q, k, v and upstream gradient of
shape (task.batch_size, data.seq_len, model.n_head, model.d_model / model.n_head), in the dtype of
hardware.precision, ``task.check.repeats`` times. Its output, log-sum-exp (where the variant
exposes it: ``capabilities.lse``), dq, dk and dv are compared with the float64 dense reference
computed once from the same (dtype-rounded) inputs (``reference_with_grads``: row blocks, so no
(H, N, N) tensor is held), and with the dense attention computed in the same dtype on the same
mask (the "dense" column: the error any dense kernel makes in that dtype).

Errors: max abs = max |x - ref|; max rel = max |x - ref| / max |ref| (one number per tensor, so a
near-zero reference entry cannot blow it up). The job exits 1 when a tensor's max abs error exceeds
``task.check.tol`` x max(1, max |ref|) (tol by dtype, DESIGN's: fp32 1e-4, bf16 2e-2; a
``task.check.tol`` overrides): DESIGN's absolute tolerance for tensors of unit scale, relative
beyond it, because gradients grow with N (dv sums over every query that sees a key: at N = 8K
in bf16 dense attention's own dv error is ~5e-2 absolute, 1e-2 relative). "bitwise" says
whether every repeat gave the same bits as the first.

Processes: hardware=cp shards the sequence over the ranks (Lightning Fabric launches them, gloo
on CPU, NCCL on GPUs; the variant must declare process groups); hardware=ddp runs the whole
sequence on every rank and also reports whether all ranks agree bitwise. Results are gathered
to rank 0, which computes the reference and writes the record.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dilexp import distributed as D
from dilexp.attention import capabilities
from dilexp.attention.reference import reference_with_grads
from dilexp.errors import ConfigError
from dilexp.tasks.components import apply_hardware, attention_parts, compute_device, model_config
from dilexp.tasks.context import JobContext
from dilexp.telemetry.record import RunRecord

QUANTITIES = ("out", "lse", "dq", "dk", "dv")
PRECISIONS = {
    "32-true": torch.float32, "32": torch.float32, "64-true": torch.float64, "64": torch.float64,
    "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16, "16-true": torch.float16,
}
# DESIGN section 3 for fp32 and bf16; fp16 has 3 more mantissa bits than bf16; fp64 leaves room
# for fp32 constants inside kernels.
DEFAULT_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-8}


def dtype_of(precision: Any) -> torch.dtype:
    key = str(precision)
    if key not in PRECISIONS:
        raise ConfigError("hardware.precision", precision, f"task=check takes one of {sorted(PRECISIONS)}")
    return PRECISIONS[key]


def world_size(hw: DictConfig) -> int:
    devices = hw.get("devices", 1)
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError("hardware.devices", devices, "task=check needs a device count (an int >= 1)")
    return devices * int(hw.get("num_nodes", 1))


class PreparedCheck:
    """Settings checked and the variant built (so a bad setting fails before any work)."""

    def __init__(self, cfg: DictConfig) -> None:
        t = cfg.task
        c = t.check
        self.batch = int(t.batch_size)
        if self.batch < 1:
            raise ConfigError("task.batch_size", t.batch_size, "must be >= 1")
        self.repeats = int(c.repeats)
        if self.repeats < 1:
            raise ConfigError("task.check.repeats", c.repeats, "must be >= 1")
        self.dtype = dtype_of(cfg.hardware.precision)
        tol = c.get("tol")
        if tol is not None and not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0):
            raise ConfigError("task.check.tol", tol, "must be null (the dtype's) or a number > 0")
        self.tol = float(tol) if tol is not None else DEFAULT_TOL[self.dtype]
        self.causal = bool(c.causal)
        self.seq_len = int(cfg.data.seq_len)
        if self.seq_len < 1:
            raise ConfigError("data.seq_len", cfg.data.seq_len, "must be >= 1")
        apply_hardware(cfg)
        self.device = compute_device(cfg)
        self.world = world_size(cfg.hardware)
        self.name = str(cfg.attention.name)
        self.caps = capabilities(self.name)
        self.cp = bool(cfg.hardware.get("context_parallel", False))
        if self.cp:
            if not self.caps.process_groups:
                raise ConfigError("attention.name", self.name, "hardware=cp shards the sequence over ranks: the "
                                  "variant must declare capabilities.process_groups")
            D.check_shardable(self.seq_len, self.world)
        self.placement = str(cfg.attention.get("placement", "contiguous")) if self.cp else "contiguous"
        mcfg = model_config(cfg, vocab_size=2)
        self.heads, self.head_dim = mcfg.n_head, mcfg.head_dim
        self.parts = attention_parts(cfg, self.heads, self.head_dim)
        self.attn = self.parts.make()
        self.backward = self.caps.backward_on(self.device)
        self.baseline = bool(c.get("baseline", True))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``x`` (so NaNs and signed zeros compare too)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    return x.detach().contiguous().view(ints)


def _run_once(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
              causal: bool, backward: bool, lse: bool) -> dict[str, torch.Tensor]:
    """One forward (+ backward) of the variant on fresh leaves; lse from ``forward_lse``."""
    leaves = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    res: dict[str, torch.Tensor] = {}
    with torch.set_grad_enabled(backward):
        out = attn(*leaves, causal=causal)
    res["out"] = out.detach()
    if backward:
        grads = torch.autograd.grad(out, leaves, dout)
        res.update(dq=grads[0], dk=grads[1], dv=grads[2])
    if lse:
        _, res["lse"] = attn.forward_lse(q, k, v, causal=causal)
    return res


def dense_same_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, mult_rows: Any,
                     causal: bool, backward: bool) -> dict[str, torch.Tensor]:
    """Dense masked attention in the inputs' dtype (torch SDPA, one head at a time, the pattern's
    log-multiplicity as an additive mask): the error a dense kernel makes in this dtype."""
    b, n, h, d = q.shape
    res = {key: torch.zeros_like(q) for key in ("out", "dq", "dk", "dv")}
    for head in range(h):
        mult = mult_rows(head, 0, n).to(q.device)
        if causal:
            mult = torch.tril(mult)
        bias = torch.log(mult.to(torch.float32)).to(q.dtype)
        empty = (mult.sum(-1) == 0)[None, None, :, None]
        bias = bias.masked_fill(empty[0, 0], 0.0)  # empty rows: no NaN, zeroed below
        leaves = [x[:, :, head : head + 1].transpose(1, 2).detach().clone().requires_grad_(backward)
                  for x in (q, k, v)]
        with torch.set_grad_enabled(backward):
            o = F.scaled_dot_product_attention(*leaves, attn_mask=bias).masked_fill(empty, 0.0)
        res["out"][:, :, head] = o.detach().transpose(1, 2)[:, :, 0]
        if backward:
            grads = torch.autograd.grad(o, leaves, dout[:, :, head : head + 1].transpose(1, 2))
            for key, g in zip(("dq", "dk", "dv"), grads, strict=True):
                res[key][:, :, head] = g.transpose(1, 2)[:, :, 0]
    return res


def gate(max_abs: float, max_rel: float, tol: float) -> bool:
    """max|err| <= tol * max(1, max|ref|), from the two reported numbers."""
    scale = max_abs / max_rel if max_rel > 0 and math.isfinite(max_rel) else 0.0
    return max_abs <= tol * max(1.0, scale)


def compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|) over finite reference entries; a row that is
    -inf (no allowed key) in one and not the other is an infinite error."""
    finite = torch.isfinite(ref)
    got = got.to(torch.float64)
    if not torch.equal(torch.isfinite(got), finite) or not torch.equal(got[~finite], ref[~finite]):
        return math.inf, math.inf
    if not finite.any():
        return 0.0, 0.0
    err = (got[finite] - ref[finite]).abs().max().item()
    scale = ref[finite].abs().max().item()
    return err, (err / scale if scale > 0 else (0.0 if err == 0 else math.inf))


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def format_table(rows: dict[str, dict[str, Any]], head: str, verdict: str) -> str:
    lines = [head, f"{'':<4}{'max abs':>10} {'max rel':>10} {'dense abs':>10} {'dense rel':>10}  bitwise"]
    for key, r in rows.items():
        bit = "-" if r.get("bitwise") is None else ("yes" if r["bitwise"] else "NO")
        lines.append(f"{key:<4}{_fmt(r.get('max_abs')):>10} {_fmt(r.get('max_rel')):>10} "
                     f"{_fmt(r.get('dense_abs')):>10} {_fmt(r.get('dense_rel')):>10}  {bit}")
    lines.append(verdict)
    return "\n".join(lines)


def run_check(cfg: DictConfig, ctx: JobContext, prepared: PreparedCheck, record: RunRecord) -> dict[str, Any]:
    p = prepared
    hw = cfg.hardware
    device, rank, fabric = p.device, 0, None
    group = None
    if p.world > 1:
        from lightning.fabric import Fabric
        from lightning.fabric.strategies import DDPStrategy

        timeout = float(hw.get("timeout_s", 300))
        fabric = Fabric(accelerator=str(hw.accelerator), devices=int(hw.devices), num_nodes=int(hw.get("num_nodes", 1)),
                        strategy=DDPStrategy(timeout=timedelta(seconds=timeout)), precision="32-true")
        fabric.launch()  # in rank 0 this starts the other ranks (each re-runs this command)
        device, rank = fabric.device, fabric.global_rank
        if p.cp:
            group = D.init_context_parallel(timeout_s=timeout)
            p.attn.set_shard(p.seq_len)
    attn = p.attn.to(device)

    # The same inputs on every rank: seeded, drawn in fp32 on the CPU, rounded to the dtype once.
    gen = torch.Generator().manual_seed(int(cfg.seed))
    shape = (p.batch, p.seq_len, p.heads, p.head_dim)
    q, k, v, dout = (torch.randn(shape, generator=gen).to(p.dtype).to(device) for _ in range(4))
    shard = (lambda x: D.shard_sequence(x, D.group_rank_world(group)[0], p.world, p.placement)) if p.cp \
        else (lambda x: x)
    ql, kl, vl, gl = (shard(x) for x in (q, k, v, dout))
    attn.prepare(p.seq_len, device, causal=p.causal)

    runs, times = [], []
    for _ in range(p.repeats):
        t0 = time.perf_counter()
        runs.append(_run_once(attn, ql, kl, vl, gl, p.causal, p.backward, p.caps.lse))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    first = runs[0]
    bitwise = {key: all(torch.equal(_bits(r[key]), _bits(first[key])) for r in runs[1:]) for key in first}

    ranks_equal = None
    if fabric is not None:
        # Under cp each rank holds a shard: gather them; the bitwise flags must hold on every rank.
        flags = torch.tensor([float(bitwise[key]) for key in first], device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        bitwise = {key: bool(f) for key, f in zip(first, flags.tolist(), strict=True)}
        if p.cp:
            first = {key: D.unshard_sequence(x.contiguous(), p.seq_len, group, p.placement)
                     for key, x in first.items()}
        else:
            # Data parallel: every rank ran the same inputs; they must agree to the bit.
            same = torch.ones(1, device=device)
            for x in first.values():
                ref0 = x.clone()
                torch.distributed.broadcast(ref0, src=0)
                same *= float(torch.equal(_bits(ref0), _bits(x)))
            torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
            ranks_equal = bool(same.item())
        D.set_context_parallel_group(None, enabled=False)
        if rank != 0:
            # Rank 0 alone computes the reference and owns the verdict (its exit code is the
            # job's). The others leave now rather than wait in a collective: at large N the
            # reference can take longer than the process group's timeout.
            return {"metrics": {}, "exit_code": 0}

    mult_rows = lambda head, start, stop: attn.dense_multiplicity_rows(p.seq_len, head, start, stop)
    rows: dict[str, dict[str, Any]] = {}
    passed = True
    # Rank 0 from here on.
    t0 = time.perf_counter()
    ref = reference_with_grads(q, k, v, dout, mult_rows, p.causal)
    ref_s = time.perf_counter() - t0
    dense = dense_same_dtype(q, k, v, dout, mult_rows, p.causal, p.backward) if p.baseline else {}
    for key in QUANTITIES:
        if key not in first:
            continue
        max_abs, max_rel = compare(first[key], ref[key])
        row: dict[str, Any] = {"max_abs": max_abs, "max_rel": max_rel, "bitwise": bitwise[key]}
        if key in dense:
            row["dense_abs"], row["dense_rel"] = compare(dense[key], ref[key])
        rows[key] = row
        row["ok"] = gate(max_abs, max_rel, p.tol)
        passed = passed and row["ok"]

    layout = (f"cp over {p.world} ranks, {p.placement}" if p.cp and fabric is not None else
              f"ddp over {p.world} ranks, ranks bitwise equal: {ranks_equal}" if fabric is not None else "1 process")
    head = (f"task=check attention={p.name}  B={p.batch} N={p.seq_len} H={p.heads} D={p.head_dim} "
            f"{'causal' if p.causal else 'full'}  {str(p.dtype).removeprefix('torch.')}  {layout}  "
            f"device {device.type}; errors against float64, rel = max|err| / max|ref|")
    missing = [key for key in QUANTITIES if key not in rows]
    notes = []
    if not p.backward:
        notes.append(f"no gradients: {p.name} has no backward on {device.type}")
    if "lse" in missing:
        notes.append(f"no lse: {p.name} does not expose it")
    bad = [key for key, r in rows.items() if not r["ok"]]
    verdict = (f"PASS: every max abs error <= tol {p.tol:g} x max(1, max|ref|)" if passed else
               f"FAIL: {', '.join(bad)} above tol {p.tol:g} x max(1, max|ref|)")
    verdict += "" if not notes else "  (" + "; ".join(notes) + ")"
    print(format_table(rows, head, verdict), flush=True)

    metrics: dict[str, Any] = {"check/passed": float(passed), "check/tol": p.tol, "check/world": float(p.world),
                               "check/seq_len": float(p.seq_len), "check/reference_s": ref_s,
                               "check/run_s_median": sorted(times)[len(times) // 2]}
    for key, r in rows.items():
        metrics[f"check/{key}/max_abs"] = r["max_abs"]
        metrics[f"check/{key}/max_rel"] = r["max_rel"]
        metrics[f"check/{key}/bitwise"] = float(r["bitwise"])
        if "dense_abs" in r:
            metrics[f"check/dense/{key}/max_abs"] = r["dense_abs"]
            metrics[f"check/dense/{key}/max_rel"] = r["dense_rel"]
    if ranks_equal is not None:
        metrics["check/ranks_bitwise_equal"] = float(ranks_equal)
    info = {"variant": p.name, "shape": list(shape), "causal": p.causal, "dtype": str(p.dtype), "world": p.world,
            "layout": layout, "tol": p.tol, "repeats": p.repeats, "passed": passed, "rows": rows,
            "relative_error": "max|x - ref| / max|ref| over the whole tensor",
            "gate": "max|x - ref| <= tol * max(1, max|ref|)", "notes": notes}
    record.update(check=info)
    if not passed:
        print(f"dilexp: check failed: {', '.join(bad)} above tol {p.tol:g}", file=sys.stderr, flush=True)
    return {"metrics": metrics, "check": info, "exit_code": 0 if passed else 1}
