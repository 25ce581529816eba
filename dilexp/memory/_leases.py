"""Who holds which buffer of the bucketed pool: leases of handed-out buffers, and reclaim.

A lease records a handed-out buffer weakly (a buffer dropped without ``release`` is
counted as dropped, never kept alive). With ``reclaim`` the pool also keeps each
handed-out storage ("lent") and takes back one that nobody else references any more.
``LeaseBook`` is a part of ``BucketedPool``: its methods run with the pool's lock held
and keep the pool's counters.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from dilexp.memory._bucket_plan import FreeKey, RequestPlan

# torch's count of references to a storage (private, present since torch 2.1): without
# it nothing can be reclaimed, and ``reclaim`` is a no-op.
USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)

Lease = tuple[weakref.ref[torch.Tensor], FreeKey, int, int]


class LeaseBook:
    """Lease and reclaim bookkeeping of ``BucketedPool`` (see the module docstring)."""

    # State owned by BucketedPool.__init__.
    reclaim: bool
    max_bytes: int | None
    _in_use: dict[int, Lease]
    _lent: dict[FreeKey, dict[int, tuple[torch.UntypedStorage, int, int, int]]]
    _lent_bytes: int
    _in_use_bytes: int
    _peak_in_use: int
    _slack: int
    _sweep_at: int
    _requests: int
    _reuses: int
    _reclaims: int
    _reclaimed_bytes: int
    _dropped: int
    _dropped_bytes: int

    def _reclaim(self, key: FreeKey, plan: RequestPlan, shape: Any, dtype: torch.dtype,
                 dev: torch.device) -> torch.Tensor | None:
        # Caller holds the lock. A storage whose only reference is ours has no tensor left
        # anywhere (caller, views, autograd's saved tensors): handing it out again is safe.
        lent = self._lent.get(key)
        if not lent:
            return None
        for ptr_, (storage, cap, ident, _) in lent.items():
            if cap < plan.nbytes or USE_COUNT(storage._cdata) != 1:
                continue
            old = self._in_use.pop(ident, None)
            if old is not None:
                if old[0]() is not None:  # id reused by a live tensor: not this storage's lease
                    self._in_use[ident] = old
                else:
                    self._forget(old)
            del lent[ptr_]
            self._lent_bytes -= cap
            self._reuses += 1
            self._reclaims += 1
            self._reclaimed_bytes += cap
            out = torch.empty(0, dtype=dtype, device=dev).set_(storage, 0, shape, plan.strides)
            self._lease(out, key, cap, plan.nbytes)
            return out
        return None

    def _lease(self, buf: torch.Tensor, key: FreeKey, cap: int, asked: int) -> None:
        # Caller holds the lock.
        ident = id(buf)
        stale = self._in_use.get(ident)
        if stale is not None:  # its buffer died unreleased and its id was reused
            self._forget(stale)
        self._in_use[ident] = (weakref.ref(buf), key, cap, asked)
        self._in_use_bytes += cap
        self._slack += cap - asked
        if self.reclaim and cap:
            self._lend(buf, key, cap, ident)
        if self._in_use_bytes > self._peak_in_use:
            self._peak_in_use = self._in_use_bytes
        if len(self._in_use) > self._sweep_at:
            self._sweep()

    def _lend(self, buf: torch.Tensor, key: FreeKey, cap: int, ident: int) -> None:
        # Caller holds the lock. Remember the storage so it can be reclaimed once dropped.
        storage = buf.untyped_storage()
        lent = self._lent.setdefault(key, {})
        known = lent.get(storage.data_ptr())
        if known is not None:
            lent[storage.data_ptr()] = (known[0], known[1], ident, self._requests)
            return
        if self.max_bytes is not None and self._lent_bytes + cap > self.max_bytes:
            return  # past the cap the buffer is tracked weakly, as without reclaim
        lent[storage.data_ptr()] = (storage, cap, ident, self._requests)
        self._lent_bytes += cap

    def _unlend(self, key: FreeKey, buf: torch.Tensor) -> None:
        # Caller holds the lock. A released buffer lives on the free list instead.
        lent = self._lent.get(key)
        if lent:
            entry = lent.pop(buf.untyped_storage().data_ptr(), None)
            if entry is not None:
                self._lent_bytes -= entry[1]

    def _drop_reclaimable(self, dev: torch.device | None, lent_before: int | None = None
                          ) -> list[torch.UntypedStorage]:
        # Caller holds the lock. Their bytes were counted as dropped when their tensors died.
        out = []
        for key, lent in self._lent.items():
            if dev is not None and key[0] != dev:
                continue
            idle = [p for p, (st, _, _, at) in lent.items()
                    if (lent_before is None or at < lent_before) and USE_COUNT(st._cdata) == 1]
            for ptr_ in idle:
                st, cap, _, _ = lent.pop(ptr_)
                self._lent_bytes -= cap
                out.append(st)
        return out

    def _forget(self, lease: Lease) -> None:
        # Caller holds the lock and has removed `lease` from _in_use (or is replacing it).
        _, _, cap, asked = lease
        self._in_use_bytes -= cap
        self._slack -= cap - asked
        self._dropped += 1
        self._dropped_bytes += cap

    def _sweep(self) -> None:
        # Caller holds the lock. Amortised: runs when the table doubles, and on stats().
        dead = [ident for ident, lease in self._in_use.items() if lease[0]() is None]
        for ident in dead:
            self._forget(self._in_use.pop(ident))
        self._sweep_at = max(256, 2 * len(self._in_use))
