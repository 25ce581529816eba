"""Lightning callbacks: one metrics line per log step (perf/*, cache/*, memory/*)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from tqdm import tqdm

from dilexp.cache.base import PatternCache, collect_stats
from dilexp.memory.base import MemoryPool
from dilexp.metrics import cache_metric, label, pool_metric

# Dense bf16 peak of the accelerators we report MFU for (vendor datasheet figures, TFLOP/s).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # no honest peak for a CPU: MFU is not reported there
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def memory_stats(device: torch.device) -> dict[str, float]:
    from dilexp.telemetry.memory import memory_snapshot

    return memory_snapshot(device)


class Telemetry(L.Callback):
    """Times steps and logs perf/*, cache/*, memory/*, pool/* every ``every`` steps.

    ``flops_per_step`` counts useful FLOPs by the model count of DESIGN section 8 (the
    attention part from the pattern's allowed pairs), so TFLOP/s and MFU stay honest for
    sparse patterns; the metrics line labels both "(model)".
    """

    def __init__(
        self,
        every: int,
        tokens_per_step: int,
        flops_per_step: float,
        caches: Callable[[], list[PatternCache]],
        pool: MemoryPool | None,
        extra: Callable[[], dict[str, float]] | None = None,
        print_lines: bool = True,
        data_parallel: bool = True,
        mesh: tuple[int, int] | None = None,
    ) -> None:
        self.data_parallel = data_parallel
        # (dp, cp): dp replicas of cp ranks; None: every rank a replica (data_parallel) or one process.
        self.mesh = mesh
        self.devices = 1
        self._scaled = False
        self.every = max(1, int(every))
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.caches, self.pool, self.extra = caches, pool, extra
        self.print_lines = print_lines
        self.step_ms: list[float] = []
        self.last: dict[str, float] = {}
        self.losses: list[float] = []
        self._t0 = 0.0
        self._window: list[float] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Data-parallel replicas each process their own batch: the job's throughput is the sum;
        # the cp ranks of a replica share one batch. Per device: the total over every rank.
        if self._scaled:
            return
        if self.mesh is None:
            self.mesh = (trainer.world_size, 1) if self.data_parallel else (1, 1)
        self.tokens_per_step *= self.mesh[0]
        self.flops_per_step *= self.mesh[0]
        self.devices = self.mesh[0] * self.mesh[1]
        self._scaled = True

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self._sync(pl_module)
        ms = (time.perf_counter() - self._t0) * 1e3
        self.step_ms.append(ms)
        self._window.append(ms)
        step = trainer.global_step
        # Step 1 is logged too: the first line shows where the loss starts.
        if step % self.every != 0 and step != 1 and not trainer.fast_dev_run:
            return
        window_ms = statistics.median(self._window)
        self._window = []
        metrics: dict[str, float] = {
            "perf/step_ms": window_ms,
            "perf/tokens_per_s": self.tokens_per_step / (window_ms / 1e3),
            "perf/tokens_per_s_per_device": self.tokens_per_step / (window_ms / 1e3) / self.devices,
            "perf/tflops": self.flops_per_step / (window_ms / 1e3) / 1e12,
            "mesh/dp": float(self.mesh[0] if self.mesh else 1), "mesh/cp": float(self.mesh[1] if self.mesh else 1),
        }
        peak = peak_tflops(pl_module.device)
        if peak:
            metrics["perf/mfu"] = metrics["perf/tflops"] / peak
        metrics.update({cache_metric(k): v for k, v in collect_stats(self.caches()).items()})
        metrics.update({f"memory/{k}": v for k, v in memory_stats(pl_module.device).items()})
        if self.pool is not None:
            metrics.update({pool_metric(k): v for k, v in self.pool.stats().items()})
        if self.extra is not None:
            metrics.update(self.extra())
        # The logged train/loss is the whole batch's (a context-parallel rank's own loss is a share).
        logged = trainer.callback_metrics.get("train/loss")
        loss = float(logged) if logged is not None else float("nan")
        metrics["train/loss_step"] = loss
        self.losses.append(loss)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        self.last = metrics
        if self.print_lines and trainer.is_global_zero:
            tqdm.write(self.format_line(step, loss, metrics))

    @staticmethod
    def format_line(step: int, loss: float, m: dict[str, float]) -> str:
        mem = m.get("memory/peak_allocated_mb", m.get("memory/peak_rss_mb", float("nan")))
        mem_kind = "peak_alloc" if "memory/peak_allocated_mb" in m else "peak_rss"
        parts = [
            f"step {step:>5}",
            f"loss {loss:7.4f}",
            f"tok/s {m['perf/tokens_per_s']:9.0f}",
        ]
        if "perf/tokens_per_s_per_device" in m and m.get("mesh/dp", 1) * m.get("mesh/cp", 1) > 1:
            # Several devices: the mesh (dp x cp) and each device's share beside the total.
            parts += [f"mesh {m['mesh/dp']:.0f}x{m['mesh/cp']:.0f}",
                      f"tok/s/dev {m['perf/tokens_per_s_per_device']:7.0f}"]
        parts += [
            f"step {m['perf/step_ms']:7.1f} ms",
            # Which FLOP count (DESIGN section 8) the figure uses is in its label.
            f"{label('perf/tflops')} {m['perf/tflops']:.3f}",
        ]
        if "perf/mfu" in m:
            parts.append(f"{label('perf/mfu')} {100 * m['perf/mfu']:.1f}%")
        parts += [f"cache hit {100 * m.get('cache/hit_rate', 0.0):5.1f}%", f"{mem_kind} {mem:8.1f} MB"]
        return " | ".join(parts)

    def summary(self) -> dict[str, float]:
        # The first steps include one-off work (pattern builds, allocator warm-up): the
        # median over the rest is the figure to compare.
        steady = self.step_ms[2:] if len(self.step_ms) > 4 else self.step_ms
        if not steady:
            return {}
        med = statistics.median(steady)
        out = {
            "perf/step_ms_median": med,
            "perf/tokens_per_s_median": self.tokens_per_step / (med / 1e3),
            "perf/tokens_per_s_per_device_median": self.tokens_per_step / (med / 1e3) / self.devices,
            "mesh/dp": float(self.mesh[0] if self.mesh else 1), "mesh/cp": float(self.mesh[1] if self.mesh else 1),
            "perf/tflops_median": self.flops_per_step / (med / 1e3) / 1e12,
            "perf/steps_timed": float(len(steady)),
        }
        if len(steady) >= 4:
            q = statistics.quantiles(steady, n=4)
            out["perf/step_ms_p25"], out["perf/step_ms_p75"] = q[0], q[2]
        return out
