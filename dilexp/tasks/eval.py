"""task=eval: a task=train checkpoint on the validation split at data.seq_len, and passkey retrieval.

The model's shape comes from the training run (its .hydra/config.yaml beside the checkpoint), since
it has to match the weights; everything else (data and its length, attention, cache, hardware)
from this job's own config, so one checkpoint can be read at 1x..8x its training length or through
another attention variant. Validation runs through the training code (LMModule under
``trainer.validate``), so val/loss, val/acc and val/acc_dist/* mean what they mean in training.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from dilexp.cache import pregenerate_patterns
from dilexp.data import build_datamodule
from dilexp.errors import ConfigError
from dilexp.evals.passkey import PasskeyGrid, PasskeyVocab, run_passkey
from dilexp.evals.plots import passkey_heatmap
from dilexp.tasks.components import apply_hardware, build_model, compute_device, model_config
from dilexp.tasks.context import JobContext
from dilexp.tasks.train import LMModule, make_loggers
from dilexp.telemetry.record import RunRecord, read_summary
from dilexp.telemetry.wandb_logger import SafeWandbLogger

CKPT = "task.ckpt"


def _one_line(e: BaseException, limit: int = 120) -> str:
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first[:limit]}" + ("..." if len(first) > limit else "")


def resolve_checkpoint(value: Any) -> Path:
    """The .ckpt file ``task.ckpt`` names: the file itself, or a run folder's checkpoints/last.ckpt."""
    if value is None or not str(value).strip():
        raise ConfigError(CKPT, value, "set it to a task=train run folder or a .ckpt file "
                          "(python -m dilexp task=eval task.ckpt=outputs/runs/DATE/TIME)")
    path = Path(str(value)).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(CKPT, str(value), f"a folder without {last.relative_to(path)}: not a task=train run "
                              "folder, or a run that kept no checkpoint (debug=fast_dev_run, task.checkpoint=false)")
        path = last
    elif not path.is_file():
        raise ConfigError(CKPT, str(value), "no such file or folder")
    return path.resolve()


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The GPT's weights (``model.`` prefix dropped) and the training step of a Lightning checkpoint."""
    try:
        # Tensors and plain containers only: a checkpoint is data, never code to run.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch says, the file cannot be used
        raise ConfigError(CKPT, str(path), "cannot read the checkpoint: not a torch checkpoint, or a damaged one "
                          f"({_one_line(e)})") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    weights = {k[len("model."):]: v for k, v in (state or {}).items()
               if isinstance(k, str) and k.startswith("model.") and isinstance(v, torch.Tensor)}
    if "tok_emb.weight" not in weights:
        raise ConfigError(CKPT, str(path), "not a task=train checkpoint: no state_dict with the model.* weights "
                          "of a dilexp LM")
    step = ckpt.get("global_step")
    return weights, int(step) if isinstance(step, int) else None


def run_folder_of(ckpt: Path) -> Path:
    """The training run a checkpoint belongs to (``<run>/checkpoints/x.ckpt``), else its folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def read_train_config(run: Path) -> DictConfig | None:
    """The training run's composed config, when it sits beside the checkpoint."""
    path = run / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.load(path)
        if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("model"), DictConfig):
            raise ValueError("no model node")
        OmegaConf.to_container(cfg.model, resolve=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(CKPT, str(run), f"cannot read the training run's config {path} ({_one_line(e)})") from None
    return cfg


def train_model_choice(run: Path) -> str | None:
    """The training run's `model=` choice (its summary.json, else .hydra/hydra.yaml)."""
    choice = ((read_summary(run) or {}).get("choices") or {}).get("model")
    if choice:
        return str(choice)
    try:
        hydra_cfg = OmegaConf.load(run / ".hydra" / "hydra.yaml")
        return str(OmegaConf.select(hydra_cfg, "hydra.runtime.choices.model")) or None
    except Exception:  # noqa: BLE001 - only a label in the record
        return None


def checkpoint_shape(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """The model settings a checkpoint's tensors fix (n_head does not show in weight shapes)."""
    vocab, d_model = weights["tok_emb.weight"].shape
    shape = {"vocab_size": int(vocab), "d_model": int(d_model),
             "n_layer": len({k.split(".")[1] for k in weights if k.startswith("blocks.")})}
    mlp = weights.get("blocks.0.mlp.0.weight")
    if mlp is not None:
        shape["mlp_ratio"] = int(mlp.shape[0]) // int(d_model)
    return shape


def check_eval_settings(t: DictConfig) -> None:
    for key in ("batch_size", "val_batches"):
        if int(t[key]) < 1:
            raise ConfigError(f"task.{key}", t[key], "must be >= 1")


def one_device(hw: DictConfig) -> None:
    devices = hw.get("devices", 1)
    if str(devices) != "1" or int(hw.get("num_nodes", 1)) != 1:
        raise ConfigError("hardware.devices", devices, "task=eval runs on one device (hardware=cpu or hardware=gpu)")


def passkey_plan(t: DictConfig, seq_len: int) -> tuple[list[int], list[float], int]:
    """(lengths, depths, samples) of the passkey grid, each setting checked."""
    pk = t.passkey
    depths = [float(d) for d in (pk.get("depths") or [])]
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ConfigError("task.passkey.depths", list(depths), "a non-empty list of fractions in [0, 1]")
    samples = int(pk.get("samples", 32))
    if samples < 1:
        raise ConfigError("task.passkey.samples", samples, "must be >= 1")
    if pk.get("lengths"):
        lengths = [int(n) for n in pk.lengths]
        if any(n < 3 for n in lengths):
            raise ConfigError("task.passkey.lengths", lengths, "each length must be >= 3 (key, value, query)")
    else:
        factors = [float(f) for f in (pk.get("length_factors") or [])]
        if not factors or any(f <= 0 for f in factors):
            raise ConfigError("task.passkey.length_factors", factors, "a non-empty list of numbers > 0")
        lengths = [int(round(f * seq_len)) for f in factors]
        if any(n < 3 for n in lengths):
            raise ConfigError("task.passkey.length_factors", factors,
                              f"x data.seq_len={seq_len} gives lengths {lengths}: each must be >= 3")
    return sorted(set(lengths)), depths, samples


class PreparedEval:
    """The checkpoint read and checked, the model rebuilt around it, the data: before anything runs."""

    def __init__(self, cfg: DictConfig) -> None:
        t = cfg.task
        self.ckpt = resolve_checkpoint(t.get("ckpt"))
        check_eval_settings(t)
        one_device(cfg.hardware)
        self.seq_len = int(cfg.data.seq_len)
        self.passkey: tuple[list[int], list[float], int] | None = None
        self.note: str | None = None
        if t.passkey.get("enabled", True):
            if str(cfg.data.name) == "recall":
                self.passkey = passkey_plan(t, self.seq_len)
            else:
                self.note = f"passkey skipped: data={cfg.data.name} has no key-value vocabulary (data=recall only)"

        weights, self.train_steps = load_weights(self.ckpt)
        self.train_run = run_folder_of(self.ckpt)
        train_cfg = read_train_config(self.train_run)
        self.model_choice: str | None = None
        self.train_seq_len: int | None = None
        self.model_from_train = train_cfg is not None
        if train_cfg is not None:
            self.model_from = str(self.train_run / ".hydra" / "config.yaml")
            self.model_choice = train_model_choice(self.train_run)
            seq = OmegaConf.select(train_cfg, "data.seq_len", default=None)
            self.train_seq_len = int(seq) if seq is not None else None
            # The summary's config then shows the model that was evaluated, not the eval's default.
            with open_dict(cfg):
                cfg.model = OmegaConf.create(OmegaConf.to_container(train_cfg.model, resolve=True))
        else:
            self.model_from = "this command's model settings, as no .hydra/config.yaml is beside the checkpoint"

        apply_hardware(cfg)
        self.device = compute_device(cfg)
        with open_dict(cfg):
            # Exactly task.val_batches batches of the validation split.
            cfg.data.val_samples = int(t.val_batches) * int(t.batch_size)
        self.data = build_datamodule(cfg.data, int(t.batch_size), int(cfg.seed))

        shape = checkpoint_shape(weights)
        if shape["vocab_size"] != self.data.vocab_size:
            hint = (f"set data.vocab_size={shape['vocab_size']} as in training" if str(cfg.data.name) == "recall"
                    else "evaluate with the training run's data and tokenizer")
            raise ConfigError(CKPT, str(self.ckpt), f"vocabulary mismatch: the checkpoint has {shape['vocab_size']} "
                              f"tokens, data={cfg.data.name} gives {self.data.vocab_size}; {hint}")
        want = model_config(cfg, self.data.vocab_size)
        differ = [f"model.{k}: checkpoint {v}, config {getattr(want, k)}" for k, v in shape.items()
                  if k != "vocab_size" and getattr(want, k) != v]
        if differ:
            raise ConfigError(CKPT, str(self.ckpt), f"the checkpoint's model has another shape than the model config "
                              f"({self.model_from}): " + "; ".join(differ))

        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        self.model, self.parts = build_model(cfg, self.data.vocab_size)
        self._load(weights)
        pregenerate_patterns(self.model.attention_modules(), self.seq_len, self.device, causal=True)

    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        expected = self.model.state_dict()
        bad = [f"{k} missing" for k in expected if k not in weights]
        bad += [f"{k} unexpected" for k in weights if k not in expected]
        bad += [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in weights and weights[k].shape != v.shape]
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ConfigError(CKPT, str(self.ckpt), f"the checkpoint's tensors do not fit the model config "
                              f"({self.model_from}): " + "; ".join(bad[:3]) + more)
        self.model.load_state_dict(weights, strict=True)

    def info(self) -> dict[str, Any]:
        """What was read, for the run record."""
        return {"ckpt": str(self.ckpt), "train_run": str(self.train_run), "model_from": self.model_from,
                "train_steps": self.train_steps, "train_seq_len": self.train_seq_len, "seq_len": self.seq_len,
                "length_ratio": self.seq_len / self.train_seq_len if self.train_seq_len else None,
                "val_sequences": len(self.data.val_set)}


def _say(msg: str) -> None:
    print(f"dilexp: {msg}", file=sys.stderr, flush=True)


def format_passkey_table(grid: PasskeyGrid) -> str:
    head = "passkey  depth \\ length " + " ".join(f"{n:>7}" for n in grid.lengths)
    rows = [f"{'':<9}{d:>14.0%}  " + " ".join(f"{a:>7.2f}" for a in row) for d, row in zip(grid.depths, grid.acc,
                                                                                         strict=True)]
    return "\n".join([head, *rows, f"{'':<9}{'mean':>14}  {grid.mean:7.3f}"])


def run_eval(cfg: DictConfig, ctx: JobContext, prepared: PreparedEval, record: RunRecord) -> dict[str, Any]:
    t = cfg.task
    if prepared.model_choice:
        ctx.choices["model"] = prepared.model_choice
        record.update(choices=dict(ctx.choices))
    if prepared.model_from_train and any(o.lstrip("+~").startswith("model") for o in ctx.overrides):
        _say(f"the model's settings come from the training run ({prepared.model_from}); model overrides are unused")
    info = prepared.info()
    record.update(eval=info)

    lm = LMModule(prepared.model, lr=0.0, weight_decay=0.0, betas=(0.9, 0.95), warmup_steps=0, max_steps=1,
                  min_lr_ratio=1.0, chance=getattr(prepared.data.val_set, "chance", None))  # no optimiser in validate
    loggers = make_loggers(cfg, ctx, record)
    hw = cfg.hardware
    trainer = L.Trainer(
        accelerator=str(hw.accelerator), devices=1, num_nodes=1, precision=hw.precision,
        limit_val_batches=int(t.val_batches), logger=loggers or False, callbacks=[TQDMProgressBar()],
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(ctx.run_dir),
    )
    t0 = time.perf_counter()
    trainer.validate(lm, datamodule=prepared.data, verbose=False)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update({k.replace("val/", "val/count_", 1): float(n) for k, n in lm.bin_counts.items()})
    metrics["eval/val_s"] = time.perf_counter() - t0
    result: dict[str, Any] = {"metrics": metrics, "eval": info}

    if prepared.passkey is not None:
        lengths, depths, samples = prepared.passkey
        model = prepared.model.to(prepared.device).eval()
        # Lightning moved the module back to the CPU after validating; the precision plugin gives
        # the same autocast (bf16-mixed ...) that validation ran under.
        precision = trainer.precision_plugin

        def last_logits(ids: torch.Tensor) -> torch.Tensor:
            with precision.forward_context():
                return model(ids)[:, -1].float()

        t0 = time.perf_counter()
        grid = run_passkey(last_logits, lengths, depths, samples, PasskeyVocab.from_recall(prepared.data.val_set),
                           seed=int(cfg.seed), batch_size=int(t.batch_size), device=prepared.device)
        wall = time.perf_counter() - t0
        metrics.update(grid.metrics())
        trained = f", trained at {prepared.train_seq_len}" if prepared.train_seq_len else ""
        chance = getattr(prepared.data.val_set, "chance", None)
        png = passkey_heatmap(grid, ctx.run_dir / "passkey.png", train_len=prepared.train_seq_len,
                              title=f"passkey retrieval: attention={cfg.attention.name}{trained}\n"
                                    f"{samples} probes per cell, mean {grid.mean:.2f}"
                                    + (f" (chance {chance:.2f})" if chance else ""))
        result["passkey"] = {**grid.to_dict(), "plot": png.name, "wall_s": round(wall, 3)}
        print(format_passkey_table(grid), flush=True)
        for lg in loggers:
            lg.log_metrics(grid.metrics(), step=trainer.global_step)
            lg.save()
    elif prepared.note:
        _say(prepared.note)

    for lg in loggers:
        if isinstance(lg, SafeWandbLogger):
            lg.update_summary(metrics)
    return result
