"""Every config group's options, declared once, with their types and ranges (issue 14).

The yaml files in conf/ hold the defaults; these dataclasses say what a value may be. A
node of the composed config is checked against the dataclass of its option (``SCHEMAS``):
a key not declared here is a typo, a value that does not fit the annotation is a type
error, and the ``ge``/``gt``/``choices`` of a field's metadata are its range. Nothing is
filled in from here: a field's default (always None) only means "may be absent", so a
default never lives in two places.

Annotations understood by ``dilexp.config.check``: int, float, bool, str, Any, ByteSize,
``X | None``, ``list[X]``, ``Literal[...]``, unions of those, and nested dataclasses.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any


class Option:
    """A group node whose schema depends on the option chosen (``SCHEMAS``)."""


class ByteSize(int):
    """A byte count: an int >= 1, or a string such as "512MiB" / "2GB" (recorded as the int)."""


def opt(*, ge: float | None = None, gt: float | None = None, choices: tuple[Any, ...] | None = None,
        length: int | None = None) -> Any:
    """A field with its range; default None = the key may be left out of the yaml."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("choices", choices), ("length", length)) if v is not None}
    return field(default=None, metadata=meta)


def _lightning_precisions() -> tuple[Any, ...]:
    # The values Lightning's own connector accepts, so the list never drifts from the installed version.
    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:  # pragma: no cover - lightning is a dependency
        return ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", 64, 32, 16, "64", "32",
                "16", "bf16")
    out: list[Any] = []
    for lit in typing.get_args(_PRECISION_INPUT):
        out.extend(typing.get_args(lit))
    return tuple(out)


PRECISIONS = _lightning_precisions()
OFFSETS = ("head", "group")
HEADS = ("grouped", "all")
PLACEMENTS = ("contiguous", "zigzag")


# -- task ------------------------------------------------------------------------------------


@dataclass
class TrainTask:
    name: str = opt(choices=("train",))
    max_steps: int = opt(ge=1)
    batch_size: int = opt(ge=1)
    lr: float = opt(gt=0)
    min_lr_ratio: float = opt(ge=0)
    weight_decay: float = opt(ge=0)
    betas: list[float] = opt(length=2)
    warmup_steps: int = opt(ge=0)
    grad_clip: float | None = opt(ge=0)
    accumulate_grad_batches: int = opt(ge=1)
    log_every_n_steps: int = opt(ge=1)
    val_every_n_steps: int = opt(ge=1)
    val_batches: int = opt(ge=0)
    fast_dev_run: bool = opt()
    overfit_batches: int = opt(ge=0)
    checkpoint: bool = opt()
    # Checkpoints and resume (dilexp/resume.py): every n steps / s seconds (0: off); "auto", a path, or null.
    checkpoint_every_n_steps: int | None = opt(ge=0)
    checkpoint_every_s: float | None = opt(ge=0)
    resume: str | None = opt()
    # Refuse a job whose estimated peak memory exceeds what is available (dilexp/preflight.py).
    preflight: bool = opt()


@dataclass
class Passkey:
    enabled: bool = opt()
    depths: list[float] = opt()
    length_factors: list[float] = opt()
    lengths: list[int] | None = opt()
    samples: int = opt(ge=1)


@dataclass
class EvalTask:
    name: str = opt(choices=("eval",))
    ckpt: str | None = opt()
    batch_size: int = opt(ge=1)
    val_batches: int = opt(ge=1)
    passkey: Passkey = opt()
    preflight: bool = opt()


@dataclass
class CheckSettings:
    tol: float | None = opt(gt=0)
    repeats: int = opt(ge=1)
    causal: bool = opt()
    baseline: bool = opt()


@dataclass
class CheckTask:
    name: str = opt(choices=("check",))
    batch_size: int = opt(ge=1)
    check: CheckSettings = opt()
    preflight: bool = opt()


@dataclass
class BenchTask:
    name: str = opt(choices=("bench",))
    preflight: bool = opt()


@dataclass
class Bench:
    target: str = opt(choices=("attention", "model", "cache"))
    seq_lens: list[int] = opt(ge=1)
    mode: str = opt(choices=("fwd", "fwd_bwd"))
    causal: bool = opt()
    batch: int = opt(ge=1)
    heads: int = opt(ge=1)
    head_dim: int = opt(ge=1)
    dtype: str = opt(choices=("float32", "bfloat16", "float16"))
    warmup: int = opt(ge=0)
    repeats: int = opt(ge=1)
    baseline_sdpa: bool = opt()
    compare_to: str | None = opt()
    compare_cache: str | None = opt(choices=("none", "local", "cpu", "gpu"))
    compare_memory: str | None = opt(choices=("none", "bucketed", "torch"))
    matmul_reference: bool = opt()
    matmul_size: int = opt(ge=1)
    memory_pass: bool = opt()
    vocab_size: int = opt(ge=2)
    cache_calls: int = opt(ge=1)
    cache_miss_calls: int = opt(ge=1)
    docs: str | None = opt()  # fixed:L | uniform:a-b | lognormal:mean (parsed by dilexp.bench.documents)


# -- model, data, hardware, logger -------------------------------------------------------------


@dataclass
class Model:
    n_layer: int = opt(ge=1)
    n_head: int = opt(ge=1)
    d_model: int = opt(ge=1)
    mlp_ratio: int = opt(ge=1)
    dropout: float = opt(ge=0)


@dataclass
class RecallData:
    name: str = opt(choices=("recall",))
    seq_len: int = opt(ge=1)
    vocab_size: int = opt(ge=1)
    num_pairs: int = opt(ge=1)
    num_queries: int = opt(ge=1)
    context_fraction: float = opt(gt=0)
    filler: str = opt(choices=("blank", "random"))
    pair_layout: str = opt(choices=("spread", "packed"))
    train_samples: int = opt(ge=1)
    val_samples: int = opt(ge=1)
    num_workers: int = opt(ge=0)


@dataclass
class TextData:
    name: str = opt(choices=("text",))
    path: str | None = opt()
    tokenizer: str = opt(choices=("byte", "char"))
    seq_len: int = opt(ge=1)
    val_fraction: float = opt(gt=0)
    train_samples: int = opt(ge=1)
    val_samples: int = opt(ge=1)
    num_workers: int = opt(ge=0)


@dataclass
class DocsData:
    name: str = opt(choices=("docs",))
    path: str | None = opt()
    field: str = opt()
    tokenizer: str = opt(choices=("byte", "char"))
    seq_len: int = opt(ge=1)
    val_fraction: float = opt(gt=0)
    train_samples: int = opt(ge=1)
    val_samples: int = opt(ge=1)
    num_workers: int = opt(ge=0)


@dataclass
class Hardware:
    accelerator: str = opt(choices=("cpu", "gpu", "cuda"))
    # A count >= 1, "auto", or a list of device indices (Lightning's forms).
    devices: int | str | list[int] = opt(ge=1, choices=("auto",))
    num_nodes: int = opt(ge=1)
    strategy: str = opt()
    precision: int | str = opt(choices=PRECISIONS)
    context_parallel: bool = opt()
    timeout_s: float = opt(gt=0)
    threads: int | None = opt(ge=1)
    # hardware=cp's mesh (issue 19): ranks per context-parallel group (null: the world), and
    # parameters, gradients and optimizer state sharded over the data-parallel replicas (FSDP2).
    cp_size: int | None = opt(ge=1)
    shard_model: bool = opt()


@dataclass
class CsvLogger:
    flush_every: int = opt(ge=1)


@dataclass
class WandbLogger:
    project: str = opt()
    entity: str | None = opt()
    mode: str = opt(choices=("auto", "online", "offline", "disabled"))


@dataclass
class Loggers:
    csv: CsvLogger = opt()
    wandb: WandbLogger = opt()


# -- attention (one schema per variant) --------------------------------------------------------


@dataclass
class SdpaAttention:
    name: str = opt()


@dataclass
class DilatedAttention:
    name: str = opt()
    segment_lengths: list[int] = opt(ge=1)
    dilation_rates: list[int] = opt(ge=1)
    offsets: str = opt(choices=OFFSETS)
    heads: str = opt(choices=HEADS)


@dataclass
class FlexAttention(DilatedAttention):
    block_size: int = opt(ge=16)


@dataclass
class RingAttention(DilatedAttention):
    chunks: int = opt(ge=1)
    placement: str = opt(choices=PLACEMENTS)


@dataclass
class BlockSparseAttention:
    name: str = opt()
    block_size: int = opt(ge=1)
    local_blocks: int = opt(ge=0)
    dilation: int = opt(ge=0)
    global_blocks: int = opt(ge=0)
    sparsity: float | None = opt(ge=0)


# -- cache and memory (one schema per option) --------------------------------------------------


@dataclass
class PlainCache:
    strategy: str = opt()


@dataclass
class CpuCache:
    strategy: str = opt()
    max_entries: int = opt(ge=1)
    max_bytes: ByteSize = opt()


@dataclass
class GpuCache(CpuCache):
    hot_max_bytes: ByteSize = opt()
    promote_after: int = opt(ge=1)
    pregenerate: bool = opt()


@dataclass
class NoMemory:
    kind: str = opt()


@dataclass
class BucketedMemory:
    kind: str = opt()
    max_bytes: ByteSize | None = opt()
    growth: float = opt(gt=1)
    exact: bool = opt()
    reclaim: bool = opt()
    reclaim_idle_requests: int = opt(ge=1)
    min_bucket_bytes: ByteSize = opt()
    min_free_fraction: float = opt(ge=0)
    min_free_bytes: int = opt(ge=0)
    check_every: int = opt(ge=1)


@dataclass
class TorchMemory:
    kind: str = opt()
    use_on_oom: bool = opt()


# -- the root ----------------------------------------------------------------------------------


@dataclass
class Root:
    seed: int | None = opt()
    group: str | None = opt()
    experiment_name: str | None = opt()
    task: Option = opt()
    model: Model = opt()
    data: Option = opt()
    cache: Option = opt()
    attention: Option = opt()
    memory: Option = opt()
    hardware: Hardware = opt()
    logger: Loggers = opt()
    bench: Bench = opt()
    # Set by hparams_search=... (the summary.json metric a sweeper optimises).
    optimized_metric: str = opt()
    # `+resume=true` on a multirun: completed jobs are kept (dilexp/sweep.py).
    resume: bool = opt()


# The schema of a group's node, chosen by the field that names its option.
SCHEMAS: dict[str, tuple[str, dict[str, type]]] = {
    "task": ("name", {"train": TrainTask, "eval": EvalTask, "check": CheckTask, "bench": BenchTask}),
    "data": ("name", {"recall": RecallData, "text": TextData, "docs": DocsData}),
    "attention": ("name", {"sdpa": SdpaAttention, "dilated": DilatedAttention, "improved": DilatedAttention,
                           "flex": FlexAttention, "ring_v2": RingAttention, "ring_v3": RingAttention,
                           "block_sparse": BlockSparseAttention}),
    "cache": ("strategy", {"none": PlainCache, "local": PlainCache, "cpu": CpuCache, "gpu": GpuCache}),
    "memory": ("kind", {"none": NoMemory, "bucketed": BucketedMemory, "torch": TorchMemory}),
}
