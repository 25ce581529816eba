"""hardware=cp: a (dp, cp) device mesh; each replica's batch has its sequence sharded over cp.

The world (devices x nodes) is ``dp`` data-parallel replicas of ``cp`` context-parallel
ranks (``hardware.cp_size``; null: the whole world is one replica, dp = 1). The ranks of a
cp group hold the same batch and run their shard of its sequence: the ring variants pass
K/V shards between them; the rest of the model (embeddings, norms, MLP) is position-wise
and runs on the shard as is, given the shard's global positions for the rotary embedding.
The replicas read different batches (a distributed sampler over the dp rank).

Gradients: every rank's gradient is averaged over the whole world (DDP, or FSDP2's
reduce-scatter over dp and all-reduce over cp); the loss is scaled by cp so that the
shards' shares add up within a replica and the replicas are averaged.
``hardware.shard_model=true``: parameters, gradients and optimizer state are sharded over
dp (FSDP2 ``fully_shard`` on the hybrid mesh, through Lightning's ModelParallelStrategy).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from omegaconf import DictConfig

from dilexp import distributed as D
from dilexp.attention import capabilities, with_capability
from dilexp.attention.ring import RingDilatedAttention, configure_ring
from dilexp.cache import pregenerate_patterns
from dilexp.errors import ConfigError


@dataclass
class ContextParallel:
    seq_len: int
    placement: str
    world: int  # ranks in one cp group (the ring's size)
    timeout_s: float
    dp: int = 1  # data-parallel replicas
    shard_model: bool = False
    rank: int = 0  # rank in the cp group
    mesh: Any = None  # torch DeviceMesh (dp, cp), once set up

    @classmethod
    def from_config(cls, cfg: DictConfig, seq_len: int) -> ContextParallel | None:
        hw = cfg.hardware
        if not hw.get("context_parallel", False):
            if hw.get("shard_model", False):
                raise ConfigError("hardware.shard_model", True, "shards over the data-parallel dimension of "
                                  "hardware=cp's mesh: use hardware=cp hardware.cp_size=1 for plain data parallel")
            return None
        devices = hw.get("devices", 1)
        if not isinstance(devices, int) or devices < 1:
            raise ConfigError("hardware.devices", devices, "hardware=cp needs a device count (an int >= 1)")
        nodes = hw.get("num_nodes", 1)
        if not isinstance(nodes, int) or nodes < 1:
            raise ConfigError("hardware.num_nodes", nodes, "must be an int >= 1")
        world = devices * nodes
        cp = hw.get("cp_size", None)
        if cp is None:
            cp = world
        if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1 or world % cp:
            raise ConfigError("hardware.cp_size", cp, f"must divide the world (hardware.devices x hardware.num_nodes "
                                                      f"= {world}): the mesh is (world / cp_size) x cp_size")
        if cp > 1 and not capabilities(str(cfg.attention.name)).process_groups:
            raise ConfigError("attention.name", str(cfg.attention.name),
                              "hardware=cp shards the sequence over ranks: it needs a variant that can "
                              f"(capabilities.process_groups): one of {with_capability(process_groups=True)}")
        D.check_shardable(seq_len, cp)
        if seq_len % cp:
            raise ConfigError("hardware.cp_size", cp, f"must divide data.seq_len={seq_len}: every context-parallel "
                                                      "rank holds an equal shard")
        placement = D.check_placement(str(cfg.attention.get("placement", "contiguous")))
        shard = hw.get("shard_model", False)
        if not isinstance(shard, bool):
            raise ConfigError("hardware.shard_model", shard, "must be true or false")
        return cls(seq_len=seq_len, placement=placement, world=cp, timeout_s=float(hw.get("timeout_s", 300)),
                   dp=world // cp, shard_model=shard)

    @property
    def mesh_label(self) -> str:
        return f"{self.dp}x{self.world}"

    def strategy(self) -> Any:
        """Lightning's strategy for this mesh: DDP (whole model per rank), or FSDP2 through
        ModelParallelStrategy; the data module splits the data over dp (``replica``)."""
        timeout = timedelta(seconds=self.timeout_s)
        if self.shard_model:
            # Lightning names its mesh (data_parallel, tensor_parallel); the second dimension has
            # the same ranks as our cp. Checkpoints: one file, the full state gathered on rank 0,
            # so last.ckpt is written and replaced in place as without sharding (dilexp.resume).
            return ModelParallelStrategy(data_parallel_size=self.dp, tensor_parallel_size=self.world,
                                         save_distributed_checkpoint=False, timeout=timeout)
        return DDPStrategy(timeout=timeout)

    def replica(self) -> tuple[int, int]:
        """(dp replicas, this rank's replica) for the data loaders (after ``setup``)."""
        return self.dp, int(self.mesh.get_local_rank("dp"))

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        """On every rank, once Lightning has started the default group (collective)."""
        self.mesh = D.init_mesh(self.dp, self.world, device.type, timeout_s=self.timeout_s)
        self.rank, world = D.group_rank_world(D.context_parallel_group())
        if world != self.world:
            raise ConfigError("hardware.cp_size", self.world, f"the cp group has {world} ranks")
        configure_ring(model, self.seq_len)
        rings = [m for m in model.modules() if isinstance(m, RingDilatedAttention)]
        pregenerate_patterns(rings, self.seq_len, device, causal=True)  # a language model's mask

    def shard_model_state(self, model: torch.nn.Module) -> None:
        """FSDP2 on each transformer block, then on the root (embeddings, tied head, final norm)."""
        from torch.distributed.fsdp import fully_shard

        mesh = D.hsdp_mesh(self.mesh)
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def checkpoint_mesh(self) -> dict[str, Any]:
        return {"dp": self.dp, "cp": self.world, "shard_model": self.shard_model}

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the context-parallel group (not differentiable: for logging)."""
        # A dead rank surfaces here first (every step logs): name it, not just gloo's "closed by peer".
        return D.all_reduce_or_name(x.clone(), D.context_parallel_group(), "the all-reduce of logged metrics",
                                    self.timeout_s)

    def shard_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a (B, N, ...) tensor."""
        return D.shard_sequence(x, self.rank, self.world, self.placement)

    def shard(self, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = [self.shard_tensor(x) for x in (ids, targets, mask)]
        positions = D.shard_positions(self.seq_len, self.rank, self.world, self.placement).to(ids.device)
        return parts[0], parts[1], parts[2], positions


def check_checkpoint_mesh(saved: dict[str, Any] | None, now: dict[str, Any], path: str) -> None:
    """A checkpoint resumes on the mesh it was written on; anything else is one line."""
    if saved is None or dict(saved) == now:
        return
    raise ConfigError("hardware.cp_size", now["cp"], f"the checkpoint {path} was written on mesh (dp {saved['dp']} x "
                      f"cp {saved['cp']}, shard_model={saved['shard_model']}); this run is (dp {now['dp']} x "
                      f"cp {now['cp']}, shard_model={now['shard_model']}): resume on the same mesh")


def read_checkpoint_mesh(path: str) -> dict[str, Any] | None:
    """The mesh a checkpoint was written on (None for one written without a mesh)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state.get("dilexp_mesh") if isinstance(state, dict) else None
