"""hardware=cp: every rank gets the same batch and runs its shard of the sequence.

The ring variants pass K/V shards between the ranks of the context-parallel group; the
rest of the model (embeddings, norms, MLP) is position-wise and runs on the shard as is,
given the shard's global positions for the rotary embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
    world: int
    timeout_s: float
    rank: int = 0

    @classmethod
    def from_config(cls, cfg: DictConfig, seq_len: int) -> ContextParallel | None:
        hw = cfg.hardware
        if not hw.get("context_parallel", False):
            return None
        if not capabilities(str(cfg.attention.name)).process_groups:
            raise ConfigError("attention.name", str(cfg.attention.name),
                              "hardware=cp shards the sequence over ranks: it needs a variant that can "
                              f"(capabilities.process_groups): one of {with_capability(process_groups=True)}")
        devices = hw.get("devices", 1)
        if not isinstance(devices, int) or devices < 1:
            raise ConfigError("hardware.devices", devices, "hardware=cp needs a device count (an int >= 1)")
        world = devices * int(hw.get("num_nodes", 1))
        D.check_shardable(seq_len, world)
        placement = D.check_placement(str(cfg.attention.get("placement", "contiguous")))
        return cls(seq_len=seq_len, placement=placement, world=world, timeout_s=float(hw.get("timeout_s", 300)))

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        """On every rank, once Lightning has started the default group (collective)."""
        group = D.init_context_parallel(timeout_s=self.timeout_s)
        self.rank, world = D.group_rank_world(group)
        if world != self.world:
            raise ConfigError("hardware.devices", self.world, f"the process group has {world} ranks")
        configure_ring(model, self.seq_len)
        rings = [m for m in model.modules() if isinstance(m, RingDilatedAttention)]
        pregenerate_patterns(rings, self.seq_len, device, causal=True)  # a language model's mask

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
