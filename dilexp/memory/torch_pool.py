"""`torch`: buffers allocated inside a ``torch.cuda.MemPool``, torch's own private-pool API.

The pool's blocks are reused by the CUDA caching allocator itself, only among the
allocations routed to this pool, so the attention buffers stop competing with
activations for the shared blocks. Freeing is torch's: a buffer returns to the pool when
its last reference goes, so ``release`` only ends the pool's bookkeeping of it.

CUDA only: on a machine without CUDA choosing it is a ConfigError at construction.
"""

from __future__ import annotations

import threading
import weakref

import torch

from dilexp.errors import ConfigError
from dilexp.memory.base import DeviceLike, MemoryPool, Shape


class TorchPool(MemoryPool):
    """Allocation routed to one ``torch.cuda.MemPool`` through ``torch.cuda.use_mem_pool``.

    Args:
        use_on_oom: let the allocator fall back on this pool's free blocks when an
            allocation outside it runs out of memory (torch's MemPool option).

    Stats: ``reuses`` counts requests served at a device address this pool handed out
    before -- the allocator's block reuse seen from outside, an estimate (a block split
    differently can reuse memory at a new address). ``pooled_bytes`` (reserved by the pool
    and unallocated) comes from a pool snapshot taken in ``stats()``, so
    ``peak_pooled_bytes`` is the peak over ``stats()`` calls. Requests for other devices
    than CUDA are plain allocations, counted in ``unpooled``.
    """

    name = "torch"

    def __init__(self, use_on_oom: bool = False) -> None:
        if not torch.cuda.is_available():
            raise ConfigError(
                "memory.kind", "torch",
                "needs CUDA (it allocates inside a torch.cuda.MemPool) and torch.cuda.is_available() "
                "is False on this machine; use memory=bucketed or memory=none",
            )
        if not (hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool")):
            raise ConfigError(
                "memory.kind", "torch",
                f"needs torch.cuda.MemPool and use_mem_pool, missing in torch {torch.__version__}",
            )
        if not isinstance(use_on_oom, bool):
            raise ConfigError("memory.use_on_oom", use_on_oom, "must be true or false")
        # Passed only when set, so torch versions whose MemPool predates the option still work.
        self._pool = torch.cuda.MemPool(use_on_oom=True) if use_on_oom else torch.cuda.MemPool()
        self._lock = threading.Lock()
        self._seen: set[int] = set()
        # id(buffer) -> (weak ref, bytes)
        self._in_use: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._sweep_at = 256
        self._requests = 0
        self._reuses = 0
        self._unpooled = 0
        self._releases = 0
        self._ignored = 0
        self._in_use_bytes = 0
        self._peak_in_use = 0
        self._peak_pooled = 0

    def empty(self, shape: Shape, dtype: torch.dtype, device: DeviceLike = None) -> torch.Tensor:
        dev = torch.device("cuda") if device is None else torch.device(device)
        if dev.type != "cuda":
            with self._lock:
                self._requests += 1
                self._unpooled += 1
            return torch.empty(shape, dtype=dtype, device=dev)
        if dev.index is None:  # use_mem_pool wants an explicit ordinal
            dev = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.use_mem_pool(self._pool, device=dev):
            t = torch.empty(shape, dtype=dtype, device=dev)
        nbytes = t.numel() * t.element_size()
        ptr = t.data_ptr()
        with self._lock:
            self._requests += 1
            if ptr in self._seen:
                self._reuses += 1
            else:
                self._seen.add(ptr)
            self._in_use[id(t)] = (weakref.ref(t), nbytes)
            self._in_use_bytes += nbytes
            if len(self._in_use) > self._sweep_at:
                self._sweep()
            if self._in_use_bytes > self._peak_in_use:
                self._peak_in_use = self._in_use_bytes
        return t

    def release(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        with self._lock:
            lease = self._in_use.pop(id(base), None)
            if lease is None or lease[0]() is not base:
                self._ignored += 1
                return
            self._releases += 1
            self._in_use_bytes -= lease[1]

    def _sweep(self) -> None:
        # Caller holds the lock. Buffers dropped without release end their lease here;
        # amortised by running when the table doubles, and on stats().
        for ident in [i for i, lease in self._in_use.items() if lease[0]() is None]:
            self._in_use_bytes -= self._in_use.pop(ident)[1]
        self._sweep_at = max(256, 2 * len(self._in_use))

    def _pool_bytes(self) -> tuple[int, int]:
        try:
            segments = self._pool.snapshot(include_traces=False)
        except TypeError:  # torch versions before the include_traces option
            segments = self._pool.snapshot()
        pool_id = tuple(self._pool.id)
        # Filtered again in case a torch version returns every pool's segments.
        mine = [s for s in segments if tuple(s.get("segment_pool_id", pool_id)) == pool_id]
        reserved = sum(int(s.get("total_size", 0)) for s in mine)
        allocated = sum(int(s.get("allocated_size", 0)) for s in mine)
        return reserved, allocated

    def stats(self) -> dict[str, float]:
        reserved, allocated = self._pool_bytes()
        pooled = max(reserved - allocated, 0)
        with self._lock:
            self._sweep()
            self._peak_pooled = max(self._peak_pooled, pooled)
            requests = self._requests
            return {
                "requests": float(requests),
                "reuses": float(self._reuses),
                "allocations": float(requests - self._reuses),
                "reuse_rate": self._reuses / requests if requests else 0.0,
                "releases": float(self._releases),
                "ignored_releases": float(self._ignored),
                "unpooled": float(self._unpooled),
                "pooled_bytes": float(pooled),
                "peak_pooled_bytes": float(self._peak_pooled),
                "reserved_bytes": float(reserved),
                "in_use_bytes": float(self._in_use_bytes),
                "in_use_buffers": float(len(self._in_use)),
                "peak_in_use_bytes": float(self._peak_in_use),
                "evictions": 0.0,
                "cleanups": 0.0,
            }

    def clear(self) -> None:
        """Forget the address history behind ``reuses``; the memory itself is torch's to free."""
        with self._lock:
            self._seen.clear()
