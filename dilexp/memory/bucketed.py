"""`bucketed`: reuse released buffers by size bucket, dtype, device (and CUDA stream, and
inference mode).

A request for ``shape`` is served from a buffer whose storage has the byte size of the
request's bucket (sizes grow geometrically by ``growth``), as a contiguous tensor of
``shape`` on that storage (not an autograd view of another tensor). A released tensor
goes back as it is, so a request of the same shape gets it back without any torch call. Released buffers
wait, idle, on a free list per (device, dtype, bucket, stream) until a request of the same
key takes them; the idle bytes are capped by ``max_bytes`` (least recently released go
first), and on CUDA they are all dropped when the device runs short of memory, since the
caching allocator cannot reclaim memory that the pool holds.

Who holds what:
- An idle buffer is referenced only by the pool.
- A handed-out buffer is referenced only by the caller; the pool keeps a weak reference.
  A buffer the caller drops without ``release`` is freed as it would be without a pool
  (counted as ``dropped``), so a forgotten release costs reuse, never memory.
- ``release`` accepts the tensor ``empty`` returned or any view of it; it takes back only
  a buffer it handed out and has not taken back yet, so a double release or a foreign
  tensor is ignored (counted) and can never put one buffer on a free list twice.

Buffers that leave their call (an attention output that autograd saves, the gradients
handed to autograd) can never be released: nobody knows when the graph is done with
them. With ``reclaim`` the pool keeps a reference to each handed-out buffer's storage
and, when a request finds no released buffer, takes back one whose storage nobody else
references any more (torch's storage use count is 1: the pool's). So a training step
gets the previous step's outputs and gradients back without any ``release``, and no
fresh pages are faulted in. Reclaimable storages count against ``max_bytes`` from the
moment they are handed out; past the cap, buffers are tracked weakly as before.

With ``exact`` a new buffer is sized to its request (rounded to 512 bytes) rather than to
the top of its bucket, and a buffer serves any later request of its bucket that fits in
it: no slack, so a pool holds no more than plain allocation would.

Request planning lives in ``_bucket_plan``, leases and reclaim in ``_leases``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

import torch

from dilexp.errors import ConfigError
from dilexp.memory._bucket_plan import ALIGN, FreeKey, Planner, RequestPlan, check_float, resolve_device, stream_id
from dilexp.memory._leases import USE_COUNT, Lease, LeaseBook
from dilexp.memory.base import DeviceLike, MemoryPool, Shape, parse_bytes

_OOM: type[BaseException] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class BucketedPool(LeaseBook, MemoryPool):
    """Size-bucketed reuse of released buffers, with a byte cap and cleanup under pressure.

    Args:
        max_bytes: cap on the idle bytes the pool holds, over all devices together (int or
            a string like ``"1GiB"``; None for no cap). A release that would exceed it drops
            the least recently released idle buffers; a single buffer larger than the cap
            is never kept.
        growth: ratio between neighbouring bucket sizes (2.0: power-of-two buckets, up to
            half of a buffer unused; 1.25: at most a fifth unused, fewer cross-size matches).
        min_bucket_bytes: size of the smallest bucket.
        min_free_fraction, min_free_bytes: on CUDA, when the memory torch could still use
            (driver free memory plus the caching allocator's unused reserve) falls below
            max(min_free_bytes, min_free_fraction * total), every idle buffer of that device
            is dropped. Devices without such a probe (CPU, meta) rely on ``max_bytes``.
        check_every: requests between two pressure checks; the probe costs tens of
            microseconds, so it stays off the per-request path.
        reclaim: take back handed-out buffers that nobody references any more (see the
            module docstring), so outputs and gradients are reused without ``release``.
        reclaim_idle_requests: a reclaimable buffer that no request has taken back for
            this many requests is let go (a shape that stopped coming, e.g. after a
            sequence-length change), checked every ``check_every`` requests.
        exact: size new buffers to the request instead of the top of its bucket.
    """

    name = "bucketed"

    def __init__(
        self,
        max_bytes: int | str | None = 2**30,
        growth: float = 1.25,
        min_bucket_bytes: int | str = ALIGN,
        min_free_fraction: float = 0.05,
        min_free_bytes: int | str = 0,
        check_every: int = 64,
        reclaim: bool = False,
        exact: bool = False,
        reclaim_idle_requests: int = 1024,
    ) -> None:
        self.max_bytes = parse_bytes("memory.max_bytes", max_bytes)
        self.growth = check_float("memory.growth", growth, 1.0, 16.0, low_open=True)
        smallest = parse_bytes("memory.min_bucket_bytes", min_bucket_bytes)
        if smallest is None or smallest < 1:
            raise ConfigError("memory.min_bucket_bytes", min_bucket_bytes, "must be >= 1")
        self.min_free_fraction = check_float("memory.min_free_fraction", min_free_fraction, 0.0, 1.0)
        self.min_free_bytes = parse_bytes("memory.min_free_bytes", min_free_bytes) or 0
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ConfigError("memory.check_every", check_every, "must be an integer >= 1")
        self.check_every = check_every
        for field, flag in (("memory.reclaim", reclaim), ("memory.exact", exact)):
            if not isinstance(flag, bool):
                raise ConfigError(field, flag, "must be true or false")
        self.reclaim = reclaim and USE_COUNT is not None
        if (isinstance(reclaim_idle_requests, bool) or not isinstance(reclaim_idle_requests, int)
                or reclaim_idle_requests < 1):
            raise ConfigError("memory.reclaim_idle_requests", reclaim_idle_requests, "must be an integer >= 1")
        self.reclaim_idle_requests = reclaim_idle_requests
        self.exact = exact

        self._planner = Planner(smallest, self.growth, exact)
        self._plans = self._planner.plans  # read directly on the hot path
        self._lock = threading.Lock()
        # Free lists per key, newest last (reuse the warmest buffer); entries (token, buffer, bytes).
        self._free: dict[FreeKey, deque[tuple[int, torch.Tensor, int]]] = {}
        # Every idle buffer's token in release order, for least-recently-released eviction.
        self._lru: OrderedDict[int, FreeKey] = OrderedDict()
        self._token = 0
        # id(buffer) -> (weak ref, key, bytes held, bytes asked for)
        self._in_use: dict[int, Lease] = {}
        # Reclaimable storages per key: storage data pointer -> (storage, bytes, id of the
        # tensor last handed out on it, request count then). Only with ``reclaim``.
        self._lent: dict[FreeKey, dict[int, tuple[torch.UntypedStorage, int, int, int]]] = {}
        self._lent_bytes = 0
        self._reclaims = 0
        self._reclaimed_bytes = 0
        self._sweep_at = 256
        self._ops = 0
        self._next_check = check_every

        self._requests = 0
        self._reuses = 0
        self._allocations = 0
        self._allocated_bytes = 0
        self._releases = 0
        self._ignored = 0
        self._dropped = 0
        self._dropped_bytes = 0
        self._pooled_bytes = 0
        self._peak_pooled = 0
        self._in_use_bytes = 0
        self._peak_in_use = 0
        self._slack = 0
        self._evictions = 0
        self._evicted_bytes = 0
        self._cleanups = 0
        self._cleanup_bytes = 0
        self._cleared_bytes = 0
        self._oom_retries = 0

    # ------------------------------------------------------------------ the hot path

    def empty(self, shape: Shape, dtype: torch.dtype, device: DeviceLike = None) -> torch.Tensor:
        if type(shape) is not tuple and type(shape) is not torch.Size:
            # lists cannot key the memo; a bare int is a 1-d shape, as in torch.empty
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
        plan = self._plans.get((shape, dtype, device))
        if plan is None:
            plan = self._planner.plan(shape, dtype, device)
        dev = plan.device
        if dev is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        # Tensors made in inference mode cannot be saved for backward or written in place
        # outside it, and Lightning validates in inference mode: the two never share buffers.
        inference = torch.is_inference_mode_enabled()
        if plan.keys is not None:
            key = plan.keys[inference]
        else:
            # A buffer released on one stream may still be read by queued kernels there;
            # handing it to another stream would race, so streams never share buffers.
            key = (dev, dtype, plan.bucket, stream_id(dev), inference)

        out = None
        aged: list[torch.UntypedStorage] | None = None
        with self._lock:
            self._requests += 1
            self._ops += 1
            free = self._free.get(key)
            entry = self._pop_fitting(free, plan.nbytes) if free else None
            if entry is not None:
                token, flat, cap = entry
                del self._lru[token]
                self._pooled_bytes -= cap
                self._reuses += 1
                # Shapes repeat step after step, so the released tensor usually fits as it is
                # and reuse costs no torch call at all.
                if flat.shape == shape and flat.is_contiguous():
                    out = flat
                else:
                    out = flat.as_strided(shape, plan.strides, 0).detach()
                self._lease(out, key, cap, plan.nbytes)
            elif self.reclaim:
                out = self._reclaim(key, plan, shape, dtype, dev)
            check = self._ops >= self._next_check
            if check:
                self._next_check = self._ops + self.check_every
                if self._lent:
                    aged = self._drop_reclaimable(None, self._requests - self.reclaim_idle_requests)
        del aged  # storages let go for age are freed here, outside the lock
        if check:
            self._check_pressure(dev)
        if out is None:
            # resize_ keeps the bucket-sized storage and, unlike a view of a flat buffer,
            # makes no autograd view: the gradients of in-place writes into a view go
            # through AsStridedBackward and would hang the graph on the buffer.
            out = self._allocate(plan, dtype, dev).resize_(shape)
            with self._lock:
                self._allocations += 1
                self._allocated_bytes += plan.cap_bytes
                self._lease(out, key, plan.cap_bytes, plan.nbytes)
        return out

    def _pop_fitting(self, free: deque[tuple[int, torch.Tensor, int]], nbytes: int
                     ) -> tuple[int, torch.Tensor, int] | None:
        # Caller holds the lock. The newest buffer fits unless ``exact`` made it smaller
        # than this request of the same bucket.
        if free[-1][2] >= nbytes:
            return free.pop()
        for i in range(len(free) - 2, -1, -1):
            if free[i][2] >= nbytes:
                entry = free[i]
                del free[i]
                return entry
        return None

    def release(self, t: torch.Tensor) -> None:
        # Handed-out tensors are not views, so a view of one has it as its _base.
        root = t._base
        if root is None:
            root = t
        dropped: list[torch.Tensor] = []
        with self._lock:
            lease = self._in_use.pop(id(root), None)
            if lease is None or lease[0]() is not root:
                self._ignored += 1
                if lease is not None:  # a dead buffer's record whose id came back
                    self._forget(lease)
                return
            _, key, cap, asked = lease
            self._in_use_bytes -= cap
            self._slack -= cap - asked
            self._releases += 1
            self._unlend(key, root)
            if self.max_bytes is not None and cap > self.max_bytes:
                self._evictions += 1
                self._evicted_bytes += cap
                return
            token = self._token
            self._token += 1
            free = self._free.get(key)
            if free is None:
                free = self._free[key] = deque()
            # The idle buffer must not keep the caller's autograd graph alive.
            free.append((token, root.detach() if root.requires_grad else root, cap))
            self._lru[token] = key
            self._pooled_bytes += cap
            if self.max_bytes is not None and self._pooled_bytes > self.max_bytes:
                dropped = self._evict_to(self.max_bytes)
            if self._pooled_bytes > self._peak_pooled:
                self._peak_pooled = self._pooled_bytes
        # The buffers in `dropped` are freed here, outside the lock: a large CPU free is an
        # munmap and should not stall other threads.
        del dropped

    # ------------------------------------------------------------------ policy

    def cleanup(self, device: DeviceLike = None) -> int:
        """Drop every idle buffer (of ``device``, or all); counts as a pressure cleanup.

        Returns the bytes dropped. Called on pressure and before retrying an allocation
        that ran out of memory; callers may also call it, e.g. after an OOM of their own.
        """
        dev = None if device is None else resolve_device(device)
        with self._lock:
            bufs, nbytes = self._drop_idle(dev)
            self._cleanups += 1
            self._cleanup_bytes += nbytes
            storages = self._drop_reclaimable(dev)
            nbytes += sum(st.nbytes() for st in storages)
        del bufs, storages
        return nbytes

    def clear(self) -> None:
        """Drop every idle buffer; counters keep counting, handed-out buffers stay valid."""
        with self._lock:
            bufs, nbytes = self._drop_idle(None)
            self._cleared_bytes += nbytes
            storages = self._drop_reclaimable(None)
        del bufs, storages

    def stats(self) -> dict[str, float]:
        with self._lock:
            self._sweep()
            requests = self._requests
            reclaimable = sum(cap for lent in self._lent.values() for st, cap, _, _ in lent.values()
                              if USE_COUNT(st._cdata) == 1)
            return {
                "requests": float(requests),
                "reuses": float(self._reuses),
                "allocations": float(self._allocations),
                "reuse_rate": self._reuses / requests if requests else 0.0,
                "releases": float(self._releases),
                "ignored_releases": float(self._ignored),
                "dropped": float(self._dropped),
                "pooled_bytes": float(self._pooled_bytes),
                "pooled_buffers": float(len(self._lru)),
                "peak_pooled_bytes": float(self._peak_pooled),
                "in_use_bytes": float(self._in_use_bytes),
                "in_use_buffers": float(len(self._in_use)),
                "peak_in_use_bytes": float(self._peak_in_use),
                "slack_bytes": float(self._slack),
                "allocated_bytes": float(self._allocated_bytes),
                "evictions": float(self._evictions),
                "evicted_bytes": float(self._evicted_bytes),
                "cleanups": float(self._cleanups),
                "cleanup_bytes": float(self._cleanup_bytes),
                "cleared_bytes": float(self._cleared_bytes),
                "dropped_bytes": float(self._dropped_bytes),
                "oom_retries": float(self._oom_retries),
                "reclaims": float(self._reclaims),
                "reclaimed_bytes": float(self._reclaimed_bytes),
                "reclaimable_bytes": float(reclaimable),
                "lent_bytes": float(self._lent_bytes),
                # Everything the pool holds that no caller uses: what it costs in memory.
                "idle_bytes": float(self._pooled_bytes + reclaimable),
            }

    def bucket_bytes(self, nbytes: int) -> int:
        """The byte size of the buffer that serves a request of ``nbytes``."""
        return self._planner.bucket_bytes(nbytes)

    def __repr__(self) -> str:
        return (f"BucketedPool(max_bytes={self.max_bytes}, growth={self.growth}, "
                f"buckets={len(self._planner.sizes)}, min_free_fraction={self.min_free_fraction})")

    # ------------------------------------------------------------------ internals

    def _allocate(self, plan: RequestPlan, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
        try:
            return torch.empty(plan.cap_elems, dtype=dtype, device=dev)
        except _OOM:
            # The caching allocator's own retry cannot see the idle buffers we hold.
            if self.cleanup(dev) == 0:
                raise
            with self._lock:
                self._oom_retries += 1
            return torch.empty(plan.cap_elems, dtype=dtype, device=dev)

    def _evict_to(self, limit: int) -> list[torch.Tensor]:
        # Caller holds the lock; the returned buffers are to be freed after releasing it.
        out = []
        while self._pooled_bytes > limit and self._lru:
            token, key = self._lru.popitem(last=False)
            free = self._free[key]
            # Tokens grow with release order, so the oldest token of a key is its leftmost.
            _, buf, cap = free.popleft()
            if not free:
                del self._free[key]
            self._pooled_bytes -= cap
            self._evictions += 1
            self._evicted_bytes += cap
            out.append(buf)
        return out

    def _drop_idle(self, dev: torch.device | None) -> tuple[list[torch.Tensor], int]:
        # Caller holds the lock.
        out: list[torch.Tensor] = []
        nbytes = 0
        for key in [k for k in self._free if dev is None or k[0] == dev]:
            for token, buf, cap in self._free.pop(key):
                del self._lru[token]
                nbytes += cap
                out.append(buf)
        self._pooled_bytes -= nbytes
        return out, nbytes

    def _available_bytes(self, dev: torch.device) -> tuple[int, int] | None:
        """(bytes torch could still allocate, total bytes) of ``dev``, or None without a probe."""
        if dev.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(dev)
        # Driver-free memory alone reads near zero whenever the caching allocator has grown,
        # which is normal in training; its unused reserve is just as available.
        st = torch.cuda.memory_stats(dev)
        unused_reserve = st.get("reserved_bytes.all.current", 0) - st.get("allocated_bytes.all.current", 0)
        return free + unused_reserve, total

    def _check_pressure(self, dev: torch.device) -> None:
        probe = self._available_bytes(dev)
        if probe is None:
            return
        available, total = probe
        if available < max(self.min_free_bytes, self.min_free_fraction * total):
            with self._lock:
                held = any(k[0] == dev for k in self._free) or any(k[0] == dev and v for k, v in self._lent.items())
            if held:
                self.cleanup(dev)
