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
(``_ring_plan.BlockOp``: per branch, the selected positions of each segment the two
blocks share), with no gather, padding or mask; K/V are never copied single-process.
On CPU the calls go to the fused flash kernel, which returns the log-sum-exp and whose
backward takes the final output and log-sum-exp; elsewhere a portable matmul path runs
on the same views. The first op to write a span of rows copies into the accumulators,
later ones merge (forward) or add (backward), and only heads with unwritten rows are
zeroed (``_ring_plan.RingPlan``).

Patterns: all ops of one call shape form one ``RingPlan``, stored in the pattern cache
(one lookup per call). ``ring_v2`` builds it on first use (default cache ``cpu``);
``ring_v3`` pre-generates it for a shape (``prepare``, inside the cache's
``pregenerating()`` when it has one) before its first call, default cache ``gpu``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from dilexp.attention._kernels import build_pattern, check_dims, cpu_flash_ok
from dilexp.attention._ring_comm import TAG_DKV, TAG_FINAL, TAG_KV, Pending, RingComm, RingCommError
from dilexp.attention._ring_kernel import _unk, acc_dtype, op_backward, op_forward
from dilexp.attention._ring_plan import (
    BlockOp,
    HeadRange,
    Layout,
    RingPlan,
    build_block_pattern,
    build_ring_plan,
    make_layout,
)
from dilexp.attention.base import Attention, Capabilities
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

GroupSetting = Any  # None | "world" | dist.ProcessGroup


class _Runner:
    """One call's worth of state: layout, group, causal flag; runs forward and backward rings."""

    def __init__(self, attn: RingDilatedAttention, layout: Layout, group: Any, causal: bool,
                 device: torch.device) -> None:
        self.attn = attn
        self.layout = layout
        self.causal = causal
        self.device = device
        self.comm = None
        if layout.world > 1:
            self.comm = RingComm(group, layout.rank, layout.world, attn.name, attn.timeout_s)
        self.plan = attn.ring_plan(layout, causal, device)
        self.fused = False  # decided per call from the input (``forward``)
        # (step, op index) -> the final log-sum-exp of a q_only op, kept from forward to backward.
        self.own_lse: dict[tuple[int, int], torch.Tensor] = {}

    def _mask(self, size: int, device: torch.device) -> torch.Tensor:
        """The portable path's causal mask (above the diagonal), built once per size through the cache."""
        return self.attn.cache.get_or_build(
            ("ring_causal_mask", size), lambda: torch.ones(size, size, dtype=torch.bool).triu(1), device
        )

    def _buffer(self, like: torch.Tensor, dtype: torch.dtype, zero: tuple[HeadRange, ...] | None) -> torch.Tensor:
        """An accumulator shaped like ``like``: zeros only in the heads whose rows are not all
        written first by a copy (the plan's ``q_zero``/``k_zero``; None: everywhere).

        It comes from the pool: outputs and gradients leave the call, so only a pool that
        reclaims dropped buffers (``memory.reclaim``) gets them back."""
        buf = self.attn.pool.empty(like.shape, dtype, like.device)
        if zero is None:
            return buf.zero_()
        for heads in zero:
            buf[:, :, slice(*heads)].zero_()
        return buf

    def _forward_ops(self, j: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor) -> None:
        for i, op in enumerate(self.plan.steps[j]):
            own = op_forward(q, k, v, op, self.attn.scale, out, lse, self.fused, self._mask)
            if own is not None:
                self.own_lse[(j, i)] = own

    def _backward_ops(self, j: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      dout: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                      dv: torch.Tensor) -> None:
        for i, op in enumerate(self.plan.steps[j]):
            op_backward(q, k, v, out, dout, lse, op, self.attn.scale, dq, dk, dv, self.fused, self._mask,
                        self.own_lse.pop((j, i), None))

    def _release(self, buf: torch.Tensor | None, mine: torch.Tensor) -> None:
        """Give a receive buffer back to the pool once its transfers are complete."""
        if buf is not None and buf is not mine:
            self.attn.pool.release(buf)

    def _count(self, j: int) -> None:
        total = self.layout.pairs_per_step(j)
        self.attn._stats["steps"] += total
        self.attn._stats["skipped_steps"] += total - len(self.layout.pairs[j])

    def _kv_transfer(self, t: int, cur: torch.Tensor | None, like: torch.Tensor) -> tuple[Pending | None,
                                                                                             torch.Tensor | None]:
        """Post step t's K/V hop: pass on what this rank holds, receive what it holds at t + 1."""
        lay, comm = self.layout, self.comm
        assert comm is not None
        j, nxt = (lay.rank - t) % lay.world, (lay.rank - t - 1) % lay.world
        sends, recvs, buf = [], [], None
        if cur is not None and t + 1 <= lay.maxdist[j]:
            sends.append((cur, comm.next, TAG_KV))
        if t + 1 <= lay.maxdist[nxt]:
            shape = list(like.shape)
            shape[2] = lay.shard_len(nxt)
            buf = self.attn.pool.empty(tuple(shape), like.dtype, like.device)
            recvs.append((buf, comm.prev, TAG_KV))
        return comm.start(sends, recvs, f"K/V transfer at step {t}"), buf

    # -- forward -----------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.layout
        acc = acc_dtype(q.dtype)
        self.fused = self.attn.use_fused and cpu_flash_ok(q)
        out = self._buffer(q, acc, self.plan.q_zero)
        # Rows no op writes keep -inf (the backward never reads them).
        lse = self.attn.pool.empty(q.shape[:3], acc, q.device).fill_(float("-inf"))
        self.attn._stats["calls"] += 1
        if lay.world == 1:
            # k and v are the caller's tensors: every op reads views of them, nothing is copied.
            self._count(0)
            self._forward_ops(0, q, k, v, out, lse)
            return out.to(q.dtype), lse

        assert self.comm is not None
        kv = torch.stack([k, v]).contiguous()  # one message per hop instead of two
        cur: torch.Tensor | None = kv
        for t in range(lay.world):
            j = (lay.rank - t) % lay.world
            pending, buf = self._kv_transfer(t, cur, kv)
            self._count(j)
            if cur is not None:
                self._forward_ops(j, q, cur[0], cur[1], out, lse)
            self.comm.wait(pending)  # also completes the send of ``cur``
            self._release(cur, kv)
            cur = buf
        self.attn._stats["bytes_sent"] += self.comm.bytes_sent
        self.comm.bytes_sent = 0
        return out.to(q.dtype), lse

    def complete_lse(self, lse: torch.Tensor) -> None:
        """Write the log-sum-exps the forward kept aside (ops that alone own their rows) into
        ``lse``, so it holds every row's (forward_lse; the training path skips the copy)."""
        bsz = lse.shape[0]
        for (j, i), own in self.own_lse.items():
            op = self.plan.steps[j][i]
            op.q.view(lse, op.heads).copy_(_unk(own, bsz))

    # -- backward ----------------------------------------------------------------------

    def backward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        dout: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lay = self.layout
        acc = lse.dtype
        self.fused = self.attn.use_fused and cpu_flash_ok(q)
        dq = self._buffer(q, acc, self.plan.q_zero)
        if lay.world == 1:
            dk = self._buffer(k, acc, self.plan.k_zero)
            dv = self._buffer(v, acc, self.plan.k_zero)
            self._backward_ops(0, q, k, v, out, dout, lse, dq, dk, dv)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

        comm = self.comm
        assert comm is not None
        r, world = lay.rank, lay.world
        kv = torch.stack([k, v]).contiguous()
        cur: torch.Tensor | None = kv
        # The owner keeps its own share; the ranks after it (steps 1..maxdist) pass one
        # partial sum along, and the last sends it home, where it is added.
        incoming: tuple[Pending | None, torch.Tensor] | None = None  # partial dK/dV of the next shard
        final: tuple[Pending | None, torch.Tensor] | None = None  # the others' share of this shard
        own: torch.Tensor | None = None
        outstanding: list[Pending | None] = []
        for t in range(world):
            j = (r - t) % world
            kv_pending, buf = self._kv_transfer(t, cur, kv)
            self._count(j)
            dkv = None
            if cur is not None:
                dkv = torch.zeros((2, *cur.shape[1:]), dtype=acc, device=kv.device)
                self._backward_ops(j, q, cur[0], cur[1], out, dout, lse, dq, dkv[0], dkv[1])
                if incoming is not None:  # what the ranks between the owner and this one added
                    comm.wait(incoming[0])
                    dkv += incoming[1]
                    self._release(incoming[1], kv)
                    incoming = None
            sends, recvs = [], []
            if dkv is not None:
                if t == 0:
                    own = dkv
                elif t + 1 <= lay.maxdist[j]:
                    sends.append((dkv, comm.next, TAG_DKV))
                else:
                    sends.append((dkv, j, TAG_FINAL))
            nxt = (r - t - 1) % world
            nxt_buf = fin_buf = None
            if t >= 1 and t + 1 <= lay.maxdist[nxt]:
                nxt_buf = self.attn.pool.empty((2, kv.shape[1], lay.shard_len(nxt), *kv.shape[3:]), acc,
                                               kv.device)
                recvs.append((nxt_buf, comm.prev, TAG_DKV))
            if lay.maxdist[r] >= 1 and t == lay.maxdist[r]:
                fin_buf = self.attn.pool.empty((2, *kv.shape[1:]), acc, kv.device)
                recvs.append((fin_buf, (r + lay.maxdist[r]) % world, TAG_FINAL))
            pending = comm.start(sends, recvs, f"dK/dV transfer at step {t}")
            if nxt_buf is not None:
                incoming = (pending, nxt_buf)
            if fin_buf is not None:
                final = (pending, fin_buf)
            outstanding.append(pending)
            comm.wait(kv_pending)
            self._release(cur, kv)
            cur = buf
        for p in outstanding:  # sends must finish before their buffers go away
            comm.wait(p)
        assert own is not None
        if final is not None:
            own += final[1]
            self._release(final[1], kv)
        self.attn._stats["bytes_sent"] += comm.bytes_sent
        comm.bytes_sent = 0
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runner: _Runner) -> torch.Tensor:
        # Autocast would run the fp32 score/merge einsums in bf16 and lose the exactness.
        with torch.autocast(q.device.type, enabled=False):
            out, lse = runner.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.runner = runner
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = ctx.runner.backward(q, k, v, out, lse, dout.contiguous())
        return dq, dk, dv, None


class RingDilatedAttention(Attention):
    """Shared implementation of ``ring_v2`` and ``ring_v3`` (see the module docstring)."""

    # "fused": torch's CPU flash kernel per op (CPU only; elsewhere the portable path runs
    # anyway); "portable": explicit matmuls on the same views, the path of other devices.
    capabilities = Capabilities(
        pattern="dilated", head_layouts=("grouped", "all"), process_groups=True, lse=True,
        paths=("fused", "portable"),
        settings={"chunks": (1, 2, 3, 4, 8), "placement": ("contiguous", "zigzag")},
    )
    default_cache = "cpu"
    pregenerate = False

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
        check_dims(num_heads, head_dim)
        pattern = build_pattern(num_heads, segment_lengths, dilation_rates, offsets, heads)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ConfigError("attention.chunks", chunks, "must be an integer >= 1")
        check_placement(placement)
        if not (group is None or group == "world" or isinstance(group, dist.ProcessGroup)):
            raise ConfigError("attention.group", group,
                              "must be null (the registered context-parallel group), 'world' or a ProcessGroup")
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not timeout_s > 0):
            raise ConfigError("attention.timeout_s", timeout_s, "must be a number of seconds > 0")
        if cache is None:
            from dilexp.cache import build_cache

            cache = build_cache(self.default_cache)
        super().__init__(num_heads, head_dim, cache=cache, pool=pool)
        self.pattern = pattern
        self.branches = tuple(pattern.branches(num_heads))
        self.chunks = chunks
        self.placement = placement
        self.group_setting = group
        self._timeout_s = None if timeout_s is None else float(timeout_s)
        self.scale = 1.0 / math.sqrt(head_dim)
        self._sig = (pattern.segment_lengths, pattern.dilation_rates, pattern.offsets, pattern.heads, num_heads)
        self._global_len: int | None = None
        self._prepared: set[tuple[Any, ...]] = set()
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
        key = ("ring_plan", self._sig, lay.n, lay.world, lay.rank, self.chunks, self.placement, causal)
        return self.cache.get_or_build(key, lambda: build_ring_plan(self.branches, lay, causal), device)

    def layout(self, n: int, causal: bool, group: Any = None) -> Layout:
        rank, world = group_rank_world(group)
        return make_layout(self.branches, n, world, rank, self.chunks, self.placement, causal)

    def prepare(self, n: int, device: torch.device | str, causal: bool | None = None) -> None:
        """Build the plan this rank uses for global length ``n`` (both causal flags when None)."""
        group = self.resolve_group()
        _, world = group_rank_world(group)
        check_shardable(n, world)
        flags = (False, True) if causal is None else (causal,)
        ctx = getattr(self.cache, "pregenerating", None)
        if self.pregenerate and ctx is not None:
            with ctx():
                self._build_all(n, device, flags, group)
        else:
            self._build_all(n, device, flags, group)

    def _build_all(self, n: int, device: torch.device | str, flags: tuple[bool, ...], group: Any) -> None:
        for c in flags:
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
        return _RingFunction.apply(q, k, v, self._runner(q, k, v, causal))

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

    def _runner(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> _Runner:
        self._check_input(q, k, v)
        group = self.resolve_group()
        rank, world = group_rank_world(group)
        n = self._resolve_len(q.shape[1], group, rank, world, q.device)
        if self.pregenerate:
            # Only the mask this call uses: a plan for the other one would be held for nothing.
            key = (n, rank, world, q.device, bool(causal))
            if key not in self._prepared:
                self.prepare(n, q.device, bool(causal))
                self._prepared.add(key)
        lay = self.layout(n, bool(causal), group)
        return _Runner(self, lay, group, bool(causal), q.device)


@register("ring_v2")
class RingV2Attention(RingDilatedAttention):
    """Ring dilated attention; patterns built on first use through the cache (default ``cpu``)."""

    default_cache = "cpu"
    pregenerate = False


@register("ring_v3")
class RingV3Attention(RingDilatedAttention):
    """ring_v2 with every pattern of a shape pre-generated before the first call (default cache ``gpu``)."""

    default_cache = "gpu"
    pregenerate = True


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
