"""``ring_v2`` / ``ring_v3``: the dilated pattern (DESIGN section 3) computed by ring attention.

Sharding. The sequence dimension is sharded over the *context-parallel group* (see
``dilexp.distributed``): P ranks, layout by ``placement`` (``contiguous``: remainder to the
lowest ranks; ``zigzag``: pieces r and 2P-1-r of 2P, for causal load balance). Each rank
calls the module with its own shard, (B, N_local, H, D), for q, k and v alike; the output
is that rank's shard of the result, and its gradients flow to that rank's q, k, v only.
The module must know the global length N: call ``set_shard(N)`` once (e.g. in the
LightningModule's setup), or pass ``seq_len=N`` to the constructor; without it every call
all-gathers the local lengths to find N (one tiny collective per call).

Which group: ``group=None`` uses the registered cp group (``init_context_parallel``); when
none is registered, the default group if torch.distributed runs with more than one rank
(each rank passing its shard) unless the job declared data parallelism
(``declare_data_parallel``: whole sequences on every rank); otherwise (or P = 1) it runs
*single-process*: the same block loop over
``chunks`` blocks of the local sequence (laid out by ``placement``), which bounds the
memory one kernel call needs beyond the whole-sequence buffers (its scratch and its
gradient parts) to one block pair's. ``group="world"`` uses the default group;
a ProcessGroup object is used as given. The group is resolved at call time, because a
Lightning model is built before its process group exists.

The ring. At step t rank r holds the K/V of shard (r - t) mod P, computes every non-empty
(query block, key block) pair against it, merging partial results by log-sum-exp, while
the next shard is already on its way (``batch_isend_irecv``, posted before the compute).
Block pairs the pattern leaves empty are skipped, and a shard only travels as far as the
farthest rank that needs it: when every segment fits in a shard nothing is sent at all.
With several processes ``chunks`` cuts each rank's shard into sub-blocks (memory bound).

Backward is a custom autograd Function that runs the ring again from the saved output
and log-sum-exp: K/V travel as in the forward; the owner of a shard keeps its own share of
that shard's dK/dV, the ranks that received the shard pass one partial sum along, and the
last of them sends it straight back to the owner. Exact (not autograd through the loop),
so it works across processes.

Failures: every transfer waits at most the group timeout (``init_process_group(timeout_s)``)
and then raises ``RingCommError`` naming this rank and the peer it waited for.

Compute. A block pair is a few fused attention calls on strided views of the shards
(``patterns.ring_ops.BlockOp``: per branch, the selected positions of each segment the two
blocks share), with no gather, padding or mask; K/V are never copied single-process.
The calls go to the device's fused kernel (``_kernels.lse_kernel``: flash on CPU, flash
or memory-efficient on CUDA), which returns the log-sum-exp and whose backward takes the
final output and log-sum-exp; where none takes the inputs (fp64 on CUDA) a portable
matmul path runs on the same views. The first op to write a span of rows copies into the accumulators,
later ones merge (forward) or add (backward), and only heads with unwritten rows are
zeroed (``patterns.ring_ops.RingPlan``).

Patterns: all ops of one call shape form one ``RingPlan`` (``dilexp.patterns.ring_ops``),
stored in the pattern cache (one lookup per call). ``ring_v2`` and ``ring_v3`` differ only
in their default cache (``cpu``, ``gpu``); a cache with ``pregenerate`` (``gpu``) gets the
plan built ahead of its first use (``Attention.lookup``). The ring itself runs in
``_ring_runner``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from dilexp.attention._ring_comm import Pending, RingComm, RingCommError
from dilexp.attention._ring_runner import RingFunction, Runner
from dilexp.attention.base import Capabilities, DilatedAttentionBase
from dilexp.attention.registry import register
from dilexp.cache.base import PatternCache
from dilexp.distributed import (
    check_placement,
    check_shardable,
    group_rank_world,
    ranges_len,
    ring_group,
    shard_bounds,
    transfer_timeout_s,
)
from dilexp.errors import ConfigError
from dilexp.memory.base import MemoryPool
from dilexp.patterns.doc_ring import DocRingPlan, build_doc_ring, doc_ring_key
from dilexp.patterns.documents import DocumentLayout
from dilexp.patterns.ring_layout import Layout, make_layout
from dilexp.patterns.ring_ops import BlockOp, RingPlan, build_block_pattern, build_ring_plan, ring_key

GroupSetting = Any  # None | "world" | dist.ProcessGroup


class RingDilatedAttention(DilatedAttentionBase):
    """Shared implementation of ``ring_v2`` and ``ring_v3`` (see the module docstring)."""

    # "fused": the device's LSE kernel per op (_kernels.lse_kernel; where none takes the
    # inputs the portable path runs anyway); "portable": explicit matmuls on the same views.
    capabilities = Capabilities(
        pattern="dilated", head_layouts=("grouped", "all"), process_groups=True, lse=True,
        paths=("fused", "portable"), pool=True,
        settings={"chunks": (1, 2, 3, 4, 8), "placement": ("contiguous", "zigzag")},
    )
    default_cache = "cpu"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        offsets: str = "head",
        heads: str = "grouped",
        chunks: int = 1,
        placement: str = "contiguous",
        group: GroupSetting = None,
        cache: PatternCache | None = None,
        pool: MemoryPool | None = None,
        seq_len: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(num_heads, head_dim, segment_lengths, dilation_rates, offsets, heads, cache=cache, pool=pool)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ConfigError("attention.chunks", chunks, "must be an integer >= 1")
        check_placement(placement)
        if not (group is None or group == "world" or isinstance(group, dist.ProcessGroup)):
            raise ConfigError("attention.group", group,
                              "must be null (the registered context-parallel group), 'world' or a ProcessGroup")
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not timeout_s > 0):
            raise ConfigError("attention.timeout_s", timeout_s, "must be a number of seconds > 0")
        self.chunks = chunks
        self.placement = placement
        self.group_setting = group
        self._timeout_s = None if timeout_s is None else float(timeout_s)
        self._global_len: int | None = None
        self._stats = {"calls": 0, "steps": 0, "skipped_steps": 0, "bytes_sent": 0}
        # Tests flip this to run the portable kernel on CPU.
        self.use_fused = True
        if seq_len is not None:
            self.set_shard(seq_len)

    # -- settings ----------------------------------------------------------------------

    @property
    def timeout_s(self) -> float:
        return self._timeout_s if self._timeout_s is not None else transfer_timeout_s()

    def resolve_group(self) -> Any:
        """The process group of this call, or None for single-process (resolved on every call)."""
        g = self.group_setting
        if g is None:
            return ring_group()
        if g == "world":
            return dist.group.WORLD if (dist.is_available() and dist.is_initialized()) else None
        return g

    def set_shard(self, global_len: int) -> None:
        """Declare the global sequence length; later calls take their shard of it.

        Validates against the current cp group's size when one exists (and again on every
        call, since the group may only appear later).
        """
        if isinstance(global_len, bool) or not isinstance(global_len, int) or global_len < 1:
            raise ConfigError("data.seq_len", global_len, "must be an integer >= 1")
        _, world = group_rank_world(self.resolve_group())
        check_shardable(global_len, world)
        self._global_len = global_len

    def _resolve_len(self, n_local: int, group: Any, rank: int, world: int, device: torch.device) -> int:
        if world == 1:
            return n_local
        if self._global_len is not None:
            n = self._global_len
            check_shardable(n, world)
            expect = ranges_len(shard_bounds(n, world, self.placement)[rank])
            if n_local != expect:
                raise ValueError(f"{self.name}: rank {rank} of {world} got {n_local} positions, but its "
                                 f"{self.placement} shard of seq_len={n} has {expect}")
            return n
        # One tiny collective per call: every rank must agree on N before the ring starts.
        sizes = torch.tensor([n_local], dtype=torch.int64, device=device)
        gathered = [torch.zeros_like(sizes) for _ in range(world)]
        work = dist.all_gather(gathered, sizes, group=group, async_op=True)
        comm = RingComm(group, rank, world, self.name, self.timeout_s)
        comm.wait(Pending([work], [p for p in range(world) if p != rank], "all_gather of shard lengths"))
        lengths = [int(s.item()) for s in gathered]
        n = sum(lengths)
        check_shardable(n, world)
        expect = [ranges_len(rg) for rg in shard_bounds(n, world, self.placement)]
        if lengths != expect:
            raise ValueError(f"{self.name}: ranks hold {lengths} positions, but the {self.placement} "
                             f"layout of seq_len={n} over {world} ranks is {expect} (rank {rank} here)")
        return n

    # -- patterns ----------------------------------------------------------------------

    def block_pattern(self, q_unit: Any, k_unit: Any, causal: bool) -> tuple[BlockOp, ...]:
        """The ops of one (query block, key block) pair (for inspection; calls use ``ring_plan``)."""
        return build_block_pattern(self.branches, q_unit, k_unit, causal)

    def ring_plan(self, lay: Layout, causal: bool, device: torch.device | str) -> RingPlan:
        """Every op of one call shape, through the cache: one lookup per call, not one per pair."""
        key = ring_key(self.pattern, self.num_heads, lay, self.chunks, self.placement, causal)
        return self.lookup(key, lambda: build_ring_plan(self.branches, lay, causal), device)

    def layout(self, n: int, causal: bool, group: Any = None) -> Layout:
        rank, world = group_rank_world(group)
        return make_layout(self.branches, n, world, rank, self.chunks, self.placement, causal)

    def prepare(self, n: int, device: torch.device | str, causal: bool | None = None) -> None:
        """Build the plan this rank uses for global length ``n`` (both causal flags when None)."""
        group = self.resolve_group()
        _, world = group_rank_world(group)
        check_shardable(n, world)
        for c in (False, True) if causal is None else (causal,):
            self.ring_plan(self.layout(n, c, group), c, device)

    # -- stats -------------------------------------------------------------------------

    def ring_stats(self) -> dict[str, float]:
        """Counters since construction (forward and backward): log them as ``ring/<key>``.

        steps: block pairs visited (per ring step: query blocks x key blocks of the shard
        due at that step); skipped_steps: those with no allowed entry (no compute);
        bytes_sent: bytes this rank sent (K/V and dK/dV); calls: forward calls.
        """
        return {k: float(v) for k, v in self._stats.items()}

    def reset_ring_stats(self) -> None:
        for k in self._stats:
            self._stats[k] = 0

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, segments={list(self.pattern.segment_lengths)}, "
                f"rates={list(self.pattern.dilation_rates)}, chunks={self.chunks}, placement={self.placement}")

    # -- compute -----------------------------------------------------------------------

    def use_path(self, path: str) -> None:
        super().use_path(path)
        self.use_fused = path == "fused"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """q, k, v: this rank's shard (B, N_local, H, D) (the whole sequence single-process)."""
        return RingFunction.apply(q, k, v, self._runner(q, k, v, causal))

    def forward_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, log-sum-exp) of this rank's shard, no autograd; lse (B, N_local, H) in fp32
        (fp64 for fp64 inputs), -inf for rows the pattern leaves empty."""
        runner = self._runner(q, k, v, causal)
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            out, lse = runner.forward(q, k, v)
        runner.complete_lse(lse)
        return out, lse

    def forward_documents(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, docs: DocumentLayout
    ) -> torch.Tensor:
        """Packed documents: the same ring over a per-layout plan (``patterns.doc_ring``). ``docs``
        describes the whole sequence (global N), also when each rank holds a shard; documents
        may span shards, and block pairs no document connects are skipped."""
        return RingFunction.apply(q, k, v, self._runner(q, k, v, causal, docs))

    def doc_plan(self, docs: DocumentLayout, causal: bool, group: Any, device: torch.device | str) -> DocRingPlan:
        """This rank's layout and ops over ``docs``, through the cache (keyed by the layout)."""
        rank, world = group_rank_world(group)
        key = doc_ring_key(self.pattern, self.num_heads, docs, world, rank, self.chunks, self.placement, causal)
        return self.lookup(key, lambda: build_doc_ring(self.branches, docs, world, rank, self.chunks,
                                                       self.placement, causal), device)

    def _runner(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                docs: DocumentLayout | None = None) -> Runner:
        self._check_input(q, k, v)
        group = self.resolve_group()
        rank, world = group_rank_world(group)
        n = self._resolve_len(q.shape[1], group, rank, world, q.device)
        if docs is not None:
            if docs.n != n or docs.batch != q.shape[0]:
                raise ValueError(f"{self.name}: layout is for B={docs.batch}, N={docs.n}, got B={q.shape[0]}, "
                                 f"N={n} (the global length)")
            entry = self.doc_plan(docs, bool(causal), group, q.device)
            return Runner(self, entry.layout, group, bool(causal), q.device, plan=entry.plan)
        lay = self.layout(n, bool(causal), group)
        return Runner(self, lay, group, bool(causal), q.device)


@register("ring_v2")
class RingV2Attention(RingDilatedAttention):
    """Ring dilated attention; patterns built on first use through the cache (default ``cpu``)."""


@register("ring_v3")
class RingV3Attention(RingDilatedAttention):
    """ring_v2 with every pattern of a shape pre-generated before the first call (default cache ``gpu``)."""

    # Its only difference: the two-tier cache, whose ``pregenerate`` setting has every plan
    # built ahead of its first use (``Attention.lookup``); conf/attention/ring_v3.yaml
    # picks the same default for Hydra runs.
    default_cache = "gpu"


def configure_ring(module: torch.nn.Module, global_len: int) -> int:
    """``set_shard(global_len)`` on every ring attention inside ``module``; returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, RingDilatedAttention):
            m.set_shard(global_len)
            count += 1
    return count


def ring_stats(module: torch.nn.Module) -> dict[str, float]:
    """Summed ``ring_stats()`` of every ring attention inside ``module`` (empty when none)."""
    out: dict[str, float] = {}
    for m in module.modules():
        if isinstance(m, RingDilatedAttention):
            for key, val in m.ring_stats().items():
                out[key] = out.get(key, 0.0) + val
    return out


__all__ = ["RingCommError", "RingDilatedAttention", "RingV2Attention", "RingV3Attention", "configure_ring",
           "ring_stats"]
