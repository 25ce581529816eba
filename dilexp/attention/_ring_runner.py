"""One ring call, run: the forward and backward rings of ``ring_v2``/``ring_v3`` over a ``RingPlan``.

``_Runner`` holds one call's state (layout, group, causal flag, plan) and runs the block
ops of each ring step while the next K/V shard travels; ``RingFunction`` is the autograd
node around it (the backward runs the ring again from the saved output and log-sum-exp).
See ``dilexp.attention.ring`` for the scheme.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from dilexp.attention._doc_ring_kernel import doc_op_backward, doc_op_forward
from dilexp.attention._kernels import fused_ok
from dilexp.attention._ring_comm import TAG_DKV, TAG_FINAL, TAG_KV, Pending, RingComm
from dilexp.attention._ring_kernel import _unk, acc_dtype, op_backward, op_forward
from dilexp.patterns.doc_ring import DocOp
from dilexp.patterns.ring_layout import Layout
from dilexp.patterns.ring_ops import HeadRange, RingPlan, causal_masks, masks_key

if TYPE_CHECKING:
    from dilexp.attention.ring import RingDilatedAttention


class Runner:
    """One call's worth of state: layout, group, causal flag; runs forward and backward rings."""

    def __init__(self, attn: RingDilatedAttention, layout: Layout, group: Any, causal: bool,
                 device: torch.device, plan: RingPlan | None = None) -> None:
        self.attn = attn
        self.layout = layout
        self.causal = causal
        self.device = device
        self.comm = None
        if layout.world > 1:
            self.comm = RingComm(group, layout.rank, layout.world, attn.name, attn.timeout_s)
        # ``plan``: a per-layout plan over packed documents (``patterns.doc_ring``), else the pattern's.
        self.plan = plan if plan is not None else attn.ring_plan(layout, causal, device)
        self.fused = False  # decided per call from the input (``forward``)
        self._masks: dict[int, torch.Tensor] | None = None
        # (step, op index) -> the final log-sum-exp of a q_only op, kept from forward to backward.
        self.own_lse: dict[tuple[int, int], torch.Tensor] = {}

    def _mask(self, size: int, device: torch.device) -> torch.Tensor:
        """The portable path's causal mask (above the diagonal): the masks of every size the
        plan needs come in one cache lookup, on the first causal op of the call."""
        if self._masks is None:
            sizes = self.plan.causal_sizes
            masks = self.attn.lookup(masks_key(sizes), lambda: causal_masks(sizes), device)
            self._masks = dict(zip(sizes, masks, strict=True))
        return self._masks[size]

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
            if isinstance(op, DocOp):
                doc_op_forward(q, k, v, op, self.attn.scale, out, lse)
                continue
            own = op_forward(q, k, v, op, self.attn.scale, out, lse, self.fused, self._mask)
            if own is not None:
                self.own_lse[(j, i)] = own

    def _backward_ops(self, j: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      dout: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                      dv: torch.Tensor) -> None:
        for i, op in enumerate(self.plan.steps[j]):
            if isinstance(op, DocOp):
                doc_op_backward(q, k, v, out, dout, lse, op, self.attn.scale, dq, dk, dv)
                continue
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
        self.fused = self.attn.use_fused and fused_ok(q)
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
        self.fused = self.attn.use_fused and fused_ok(q)
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


class RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runner: Runner) -> torch.Tensor:
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
