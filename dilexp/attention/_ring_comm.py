"""Point-to-point transfers of the ring: posted together, waited with a timeout, errors that name ranks.

A transfer is posted with ``dist.batch_isend_irecv`` before the block it overlaps is
computed and waited afterwards. Every rank derives the same schedule from the same
``Layout``, so sends and receives match without any handshake; tags keep the three kinds
of message (K/V, partial dK/dV, final dK/dV) apart where two of them share a pair of ranks.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dilexp.distributed import global_rank

TAG_KV = 1
TAG_DKV = 2
TAG_FINAL = 3


class RingCommError(RuntimeError):
    """A ring transfer failed or timed out; the message names this rank and its peers."""


@dataclass
class Pending:
    works: list[dist.Work]
    peers: list[int]
    what: str
    keep: list[torch.Tensor] = field(default_factory=list)  # buffers that must outlive the sends
    done: bool = False  # a gloo Work waited twice blocks until its timeout: wait once only


class RingComm:
    """Sends/receives of one rank in a cp group, with byte counting."""

    def __init__(self, group: dist.ProcessGroup, rank: int, world: int, name: str, timeout_s: float) -> None:
        self.group = group
        self.rank = rank
        self.world = world
        self.name = name
        self.timeout_s = timeout_s
        # Gloo honours a per-wait timeout; NCCL's wait(timeout) would block the CPU on the
        # GPU stream and kill the overlap, and NCCL's watchdog enforces the group timeout anyway.
        self._cpu_wait = dist.get_backend(group) == "gloo"
        self.bytes_sent = 0

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world

    def start(
        self,
        sends: list[tuple[torch.Tensor, int, int]],
        recvs: list[tuple[torch.Tensor, int, int]],
        what: str,
    ) -> Pending | None:
        """Post (tensor, group peer, tag) sends and receives; None when there is nothing to do."""
        if not sends and not recvs:
            return None
        ops = []
        for t, peer, tag in sends:
            ops.append(dist.P2POp(dist.isend, t, global_rank(self.group, peer), self.group, tag))
            self.bytes_sent += t.numel() * t.element_size()
        for t, peer, tag in recvs:
            ops.append(dist.P2POp(dist.irecv, t, global_rank(self.group, peer), self.group, tag))
        peers = sorted({p for _, p, _ in sends} | {p for _, p, _ in recvs})
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as e:  # re-raised with the ranks named
            raise self._error(what, peers, e) from e
        return Pending(works, peers, what, [t for t, _, _ in sends])

    def wait(self, pending: Pending | None) -> None:
        if pending is None or pending.done:
            return
        timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            for w in pending.works:
                if self._cpu_wait:
                    w.wait(timeout)
                else:
                    w.wait()
        except Exception as e:  # re-raised with the ranks named
            raise self._error(pending.what, pending.peers, e) from e
        pending.done = True
        pending.keep.clear()

    def _error(self, what: str, peers: list[int], e: BaseException) -> RingCommError:
        return RingCommError(
            f"{self.name}: rank {self.rank} of {self.world}: {what} with rank(s) {peers} failed or "
            f"timed out (timeout {self.timeout_s:g}s); a peer rank probably died, hung or raised "
            f"before reaching this step. Cause: {type(e).__name__}: {e}"
        )
