"""task=train: Lightning fit + validate of the LM, with telemetry, checkpoints and a run record."""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig
from tqdm import tqdm

from dilexp.attention import capabilities
from dilexp.attention.ring import ring_stats
from dilexp.bench.flops import model_flops
from dilexp.cache import pregenerate_patterns
from dilexp.data import build_datamodule
from dilexp.errors import ConfigError
from dilexp.evals import BinnedTotals
from dilexp.models import GPT
from dilexp.patterns.documents import DocumentLayout
from dilexp.resume import (
    Checkpointing,
    checkpoint_dir,
    checkpoint_step,
    resume_checkpoint,
)
from dilexp.tasks.components import apply_hardware, build_model, compute_device
from dilexp.tasks.context import JobContext
from dilexp.tasks.context_parallel import ContextParallel, check_checkpoint_mesh, read_checkpoint_mesh
from dilexp.telemetry.callbacks import Telemetry
from dilexp.telemetry.loggers import make_loggers  # noqa: F401  (also task=eval's factory)
from dilexp.telemetry.record import RunRecord
from dilexp.telemetry.wandb_logger import SafeWandbLogger


class LMModule(L.LightningModule):
    """Next-token training of a GPT on masked targets (all tokens for text, answers for recall)."""

    def __init__(self, model: GPT, lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int,
                 max_steps: int, min_lr_ratio: float, context_parallel: ContextParallel | None = None,
                 chance: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, betas
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        self.cp = context_parallel
        self.chance = chance
        # Validation totals by key->query distance (recall) and by position (text), summed over
        # the epoch's batches and the ranks before any division; the last epoch's counts are kept.
        self._by_distance, self._by_position = BinnedTotals(), BinnedTotals()
        self.bin_counts: dict[str, int] = {}
        self._sharded = False

    def setup(self, stage: str) -> None:
        if self.cp is not None and self.cp.mesh is None:
            self.cp.setup(self.model, self.device)

    def configure_model(self) -> None:
        # hardware.shard_model: FSDP2 over the mesh's dp dimension (ModelParallelStrategy calls
        # this once the mesh exists, before the optimizer is built over the sharded parameters).
        if self.cp is not None and self.cp.shard_model and not self._sharded:
            self.cp.shard_model_state(self.model)
            self._sharded = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.cp is not None:
            checkpoint["dilexp_mesh"] = self.cp.checkpoint_mesh()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.cp is not None:
            check_checkpoint_mesh(checkpoint.get("dilexp_mesh"), self.cp.checkpoint_mesh(), "being loaded")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss_terms(self, batch: dict[str, torch.Tensor], bins: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of masked losses, correct answers, answer count) of this rank's tokens.

        Under context parallelism every rank holds the same batch and runs its shard of the
        sequence; the count is the whole batch's, so the shards' sums add up to the mean.
        ``bins``: also add this rank's tokens to the validation totals by distance / position.
        """
        ids, targets, mask = batch["input_ids"], batch["targets"], batch["loss_mask"]
        distance = batch.get("distance")
        count = mask.sum().clamp_min(1).to(torch.float32)
        positions = None
        # Packed documents: the layout is built once per step, here, and every layer reads it.
        docs = layout_of(batch)
        if self.cp is not None:
            if distance is not None:
                distance = self.cp.shard_tensor(distance)
            ids, targets, mask, positions = self.cp.shard(ids, targets, mask)
            if docs is not None:  # the shard's positions within their documents
                positions = self.cp.shard_tensor(docs.positions(ids.device))
        logits = self.model(ids, positions, docs=docs)
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        token_loss = token_loss.view_as(targets)
        loss_sum = (token_loss * mask).sum()
        hits = (logits.argmax(-1) == targets) & mask
        if bins:
            if distance is not None:
                self._by_distance.add(hits.float(), distance, mask)
            else:
                pos = positions if positions is not None else torch.arange(ids.shape[1], device=ids.device)
                if docs is not None and positions is None:
                    pos = docs.positions(ids.device)  # a document's context starts at its start
                # Position p predicts its target from p + 1 tokens of context.
                self._by_position.add(token_loss, (pos + 1).expand_as(targets), mask)
        return loss_sum, hits.sum().to(torch.float32), count

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, _, count = self._loss_terms(batch)
        loss = loss_sum / count
        # Several replicas: the logged loss is their mean (the global batch's), not rank 0's.
        many = self.cp is not None and self.cp.dp > 1
        self.log("train/loss", self._whole(loss), prog_bar=True, on_step=True, on_epoch=False, sync_dist=many)
        if self.cp is not None:
            # DDP/FSDP average gradients over all ranks; the shards' gradients must add up
            # within a replica (x cp), and the replicas are then averaged.
            loss = loss * self.cp.world
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, correct, count = self._loss_terms(batch, bins=True)
        n = float(batch["input_ids"].shape[0])
        # Under cp the shards' sums are summed first; then data-parallel ranks are averaged.
        self.log("val/loss", self._whole(loss_sum / count), prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/acc", self._whole(correct / count), batch_size=n, sync_dist=True)

    def _whole(self, part: torch.Tensor) -> torch.Tensor:
        """The whole sequence's value of a per-shard share (the share itself without cp)."""
        if self.cp is None:
            return part.detach()
        return self.cp.sum(part.detach())

    def on_validation_epoch_start(self) -> None:
        self._by_distance, self._by_position = BinnedTotals(), BinnedTotals()

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss.detach().float().clamp(max=50.0)), sync_dist=True)
        # Every rank holds distinct tokens (cp: shards; ddp: batches): the job's totals are the sums.
        reduce_sum = lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum")
        self.bin_counts = {}
        for name, totals in (("acc_dist", self._by_distance), ("loss_pos", self._by_position)):
            totals = totals.reduce(reduce_sum)
            for label, mean in totals.means().items():
                self.log(f"val/{name}/{label}", mean, sync_dist=False)
            self.bin_counts.update({f"val/{name}/{label}": n for label, n in totals.totals().items()})
        if self.chance is not None:
            self.log("val/chance", self.chance)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            tqdm.write(format_val_line(self.trainer.global_step, self.trainer.callback_metrics, self.chance))

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=self.betas,
        )

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def layout_of(batch: dict[str, torch.Tensor]) -> DocumentLayout | None:
    """The batch's document layout (data=docs), None without documents; one device sync."""
    doc_ids = batch.get("doc_ids")
    return None if doc_ids is None else DocumentLayout.from_doc_ids(doc_ids)


def format_val_line(step: int, metrics: dict[str, Any], chance: float | None) -> str:
    """The validation line: loss, accuracy on the answers and, beside it, the chance level."""
    parts = [f"val  {step:>5}", f"loss {float(metrics.get('val/loss', float('nan'))):7.4f}"]
    if "val/acc" in metrics:
        acc = float(metrics["val/acc"])
        parts.append(f"acc {acc:.3f}" + (f" (chance {chance:.3f}, {acc / chance:.1f}x)" if chance else ""))
    return " | ".join(parts)


def check_train_settings(t: DictConfig) -> None:
    for key in ("max_steps", "batch_size", "log_every_n_steps"):
        if int(t[key]) < 1:
            raise ConfigError(f"task.{key}", t[key], "must be >= 1")
    if float(t.lr) <= 0:
        raise ConfigError("task.lr", t.lr, "must be > 0")
    if int(t.get("accumulate_grad_batches", 1)) < 1:
        raise ConfigError("task.accumulate_grad_batches", t.accumulate_grad_batches, "must be >= 1")
    if int(t.warmup_steps) < 0:
        raise ConfigError("task.warmup_steps", t.warmup_steps, "must be >= 0")
    for key in ("checkpoint_every_n_steps", "checkpoint_every_s"):
        if float(t.get(key) or 0) < 0:
            raise ConfigError(f"task.{key}", t[key], "must be >= 0 (0: off)")


def train_flops_per_step(model: GPT, seq_len: int, batch_size: int) -> float:
    """Useful FLOPs of one training step by DESIGN section 8's model count (dilexp.bench.flops);
    every layer's pairs are counted, however large the mask, as the metrics line needs them."""
    return model_flops(model, seq_len, batch_size, "fwd_bwd", dense_limit=None)


class Prepared:
    """Everything built from the config, before anything runs."""

    def __init__(self, cfg: DictConfig) -> None:
        t = cfg.task
        check_train_settings(t)
        apply_hardware(cfg)
        self.device = compute_device(cfg)
        name = str(cfg.attention.name)
        if not capabilities(name).backward_on(self.device):
            # Found now rather than as a trace from inside torch at the first backward.
            raise ConfigError("attention.name", name, f"{name} has no backward on {self.device.type} in torch "
                              f"{torch.__version__}: train with attention=improved on CPU, or use hardware=gpu "
                              f"({name} serves forward-only benchmarks: task=bench bench.mode=fwd)")
        self.data = build_datamodule(cfg.data, int(t.batch_size), int(cfg.seed))
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        self.model, self.parts = build_model(cfg, self.data.vocab_size)
        self.seq_len = int(cfg.data.seq_len)
        # A sweep resumed with +resume=true, or a SLURM job requeued (preempted, or past its time
        # limit with max_num_timeout > 0), continues from the job folder's checkpoint.
        resume = t.get("resume")
        requeued = os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")
        if resume is None and (str(cfg.get("resume", "")).lower() in ("1", "true", "yes") or requeued):
            resume = "auto"
        self.resume_from = resume_checkpoint(resume, ctx_run_dir())
        self.resume_step = checkpoint_step(self.resume_from) if self.resume_from is not None else None
        self.cp = ContextParallel.from_config(cfg, self.seq_len)
        if self.cp is not None and self.resume_from is not None:
            # Before any work: a checkpoint resumes on the mesh it was written on.
            check_checkpoint_mesh(read_checkpoint_mesh(str(self.resume_from)), self.cp.checkpoint_mesh(),
                                  str(self.resume_from))
        if self.cp is not None and str(cfg.data.name) == "docs":
            check_documents_under_cp(self.model)
        if self.cp is None:
            # Under cp the patterns depend on the shard layout: they are built once the group exists.
            # The model's attention is always causal: the other mask's patterns would only be held.
            pregenerate_patterns(self.model.attention_modules(), self.seq_len, self.device, causal=True)


def model_state_mb(model: torch.nn.Module, optimizers: list[Any]) -> float:
    """This rank's parameters, gradients and optimizer state in MB: what sharding divides
    (a sharded tensor counts its local shard; a process's RSS on CPU hides it under the runtime)."""
    def local(t: Any) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    total = sum(local(p) + (local(p.grad) if p.grad is not None else 0) for p in model.parameters())
    for opt in optimizers:
        total += sum(local(v) for state in opt.state.values() for v in state.values() if v is not None and
                     getattr(v, "dim", lambda: 0)() > 0)
    return total / 2**20


def check_documents_under_cp(model: GPT) -> None:
    """Documents over a sharded sequence need a variant with its own document path: the base
    class's generic path slices documents, which a shard does not hold whole."""
    from dilexp.attention.base import Attention

    for attn in model.attention_modules():
        if type(attn).forward_documents is Attention.forward_documents:
            raise ConfigError("data.name", "docs", f"attention={attn.name} has no document path over a "
                              "context-parallel group; use hardware without cp")


def strategy(hw: DictConfig) -> Any:
    """DDP with the configured process-group timeout: a dead or hung rank ends in an error."""
    name = str(hw.get("strategy", "auto"))
    if name == "ddp":
        return DDPStrategy(timeout=timedelta(seconds=float(hw.get("timeout_s", 1800))))
    return name


def ctx_run_dir() -> Any:
    """The job's run folder (Hydra's output dir), where ``task.resume=auto`` looks."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.output_dir
    except ValueError:  # built outside a Hydra run (tests): no folder, nothing to resume
        return "."


def run_train(cfg: DictConfig, ctx: JobContext, prepared: Prepared, record: RunRecord) -> dict[str, Any]:
    t = cfg.task
    run_dir = ctx.run_dir
    model = prepared.model
    lm = LMModule(model, lr=float(t.lr), weight_decay=float(t.weight_decay), betas=tuple(t.betas),
                  warmup_steps=int(t.warmup_steps), max_steps=int(t.max_steps),
                  min_lr_ratio=float(t.min_lr_ratio), context_parallel=prepared.cp,
                  chance=getattr(prepared.data.train_set, "chance", None))

    if prepared.resume_from is not None:
        record.update(resumed={"from": str(prepared.resume_from), "step": prepared.resume_step})
    loggers = make_loggers(cfg, ctx, record, resume_step=prepared.resume_step)
    # The data continues where the checkpoint's step left it (DDP ranks each take every world-th
    # sequence; under cp the dp replicas take turns, the ranks of a replica share its batches).
    prepared.data.data_parallel = prepared.cp is None
    if prepared.cp is not None:
        prepared.data.replica = prepared.cp.replica

    tokens = int(t.batch_size) * prepared.seq_len
    telemetry = Telemetry(
        every=int(t.log_every_n_steps), tokens_per_step=tokens,
        flops_per_step=train_flops_per_step(model, prepared.seq_len, int(t.batch_size)),
        caches=lambda: prepared.parts.caches, pool=prepared.parts.pool,
        extra=lambda: {f"ring/{k}": v for k, v in ring_stats(model).items()},
        data_parallel=prepared.cp is None,
        mesh=(prepared.cp.dp, prepared.cp.world) if prepared.cp is not None else None,
    )
    callbacks: list[L.Callback] = [telemetry, TQDMProgressBar(refresh_rate=max(1, int(t.log_every_n_steps) // 2))]
    # Always there: it also turns a stop signal into a clean stop at a step end (dilexp/signals.py).
    checkpointing = Checkpointing(checkpoint_dir(run_dir), every_n_steps=int(t.get("checkpoint_every_n_steps") or 0),
                                  every_s=float(t.get("checkpoint_every_s") or 0),
                                  enabled=bool(t.get("checkpoint", True)) and not t.get("fast_dev_run"))
    callbacks.append(checkpointing)

    hw = cfg.hardware
    trainer = L.Trainer(
        accelerator=str(hw.accelerator), devices=hw.devices, num_nodes=int(hw.get("num_nodes", 1)),
        strategy=prepared.cp.strategy() if prepared.cp is not None else strategy(hw), precision=hw.precision,
        # Under cp the data module splits over the dp replicas only (cp ranks share a batch).
        use_distributed_sampler=prepared.cp is None,
        max_steps=int(t.max_steps), val_check_interval=int(t.val_every_n_steps),
        accumulate_grad_batches=int(t.get("accumulate_grad_batches", 1)),
        check_val_every_n_epoch=None, limit_val_batches=int(t.val_batches),
        num_sanity_val_steps=0,
        log_every_n_steps=int(t.log_every_n_steps), gradient_clip_val=float(t.grad_clip) or None,
        fast_dev_run=bool(t.get("fast_dev_run", False)), overfit_batches=t.get("overfit_batches", 0) or 0.0,
        default_root_dir=str(run_dir), logger=loggers or False, callbacks=callbacks,
        enable_model_summary=False, enable_checkpointing=False,
        deterministic=False,
    )
    trainer.fit(lm, datamodule=prepared.data,
                ckpt_path=str(prepared.resume_from) if prepared.resume_from is not None else None)

    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update(telemetry.summary())
    metrics.update({k: v for k, v in telemetry.last.items() if k.startswith(("cache/", "memory/", "ring/"))})
    losses = telemetry.losses or [float("nan")]
    metrics["train/loss_first"], metrics["train/loss_last"] = losses[0], losses[-1]
    metrics["train/steps"] = float(trainer.global_step)
    metrics["model/params_non_embedding"] = float(model.num_params())
    metrics["memory/model_state_mb"] = model_state_mb(lm.model, trainer.optimizers)
    metrics.update({k.replace("val/", "val/count_", 1): float(n) for k, n in lm.bin_counts.items()})
    keys = sorted({str(k) for c in prepared.parts.caches if hasattr(c, "keys") for k in c.keys()})
    for lg in loggers:
        if isinstance(lg, SafeWandbLogger) and trainer.is_global_zero:
            lg.update_summary({"cache_keys": keys, **metrics})
    # The mesh as it ran, and who started the ranks (Lightning's cluster environment: SLURM, ...).
    cp = prepared.cp
    mesh = {"dp": cp.dp if cp else trainer.world_size, "cp": cp.world if cp else 1, "world": trainer.world_size,
            "shard_model": bool(cp and cp.shard_model), "nodes": trainer.num_nodes,
            "cluster": type(getattr(trainer.strategy, "cluster_environment", None)).__name__}
    return {"metrics": metrics, "cache_keys": keys, "mesh": mesh}
