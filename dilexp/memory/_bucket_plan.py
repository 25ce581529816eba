"""Request planning of the bucketed pool: which bucket, how many bytes, which free list.

Everything about a (shape, dtype, device) request that does not change between calls is
worked out once (``RequestPlan``) and memoised, so the pool's hot path is a dict lookup.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, NamedTuple

import torch

from dilexp.errors import ConfigError
from dilexp.memory.base import DeviceLike

# The CUDA caching allocator rounds every block to 512 bytes, so finer buckets would not
# save device memory, only split reuse.
ALIGN = 512
_LARGEST = 1 << 50
_PLAN_MEMO_MAX = 4096

# (device, dtype, bucket index, CUDA stream id or 0, made in inference mode)
FreeKey = tuple[torch.device, torch.dtype, int, int, bool]


class RequestPlan(NamedTuple):
    """Everything about a (shape, dtype, device) request that does not change between calls."""

    strides: tuple[int, ...]
    nbytes: int
    cap_elems: int
    cap_bytes: int
    bucket: int
    device: torch.device | None  # None: "cuda" with no index, resolved on every call
    keys: tuple[FreeKey, FreeKey] | None  # (normal, inference mode); None on CUDA: stream read per call


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def stream_id(dev: torch.device) -> int:
    return torch.cuda.current_stream(dev).stream_id


def check_float(field: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(field, value, "expected a number") from None
    ok = (x > low if low_open else x >= low) and x <= high
    if not ok:
        lo = "(" if low_open else "["
        raise ConfigError(field, value, f"must be in {lo}{low}, {high}]")
    return x


def bucket_sizes(smallest: int, growth: float) -> list[int]:
    """Bucket byte sizes from ``smallest`` up, each ``growth`` times the last, 512-aligned."""
    sizes: list[int] = []
    size = float(smallest)
    while True:
        aligned = -(-int(math.ceil(size)) // ALIGN) * ALIGN
        if sizes and aligned <= sizes[-1]:
            aligned = sizes[-1] + ALIGN
        sizes.append(aligned)
        if aligned >= _LARGEST:
            return sizes
        size = max(size * growth, float(aligned))


def resolve_device(device: DeviceLike) -> torch.device:
    """The device a request lands on: None is the CPU, "cuda" the current CUDA device."""
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)  # an int means a CUDA ordinal here, as in torch
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class Planner:
    """Bucket sizes and the memo of request plans (``plans``: read directly on the hot path)."""

    def __init__(self, smallest: int, growth: float, exact: bool) -> None:
        self.sizes = bucket_sizes(smallest, growth)
        self.exact = exact
        self.plans: dict[tuple[Any, torch.dtype, Any], RequestPlan] = {}

    def bucket_bytes(self, nbytes: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, nbytes)]

    def plan(self, shape: Any, dtype: torch.dtype, device: DeviceLike) -> RequestPlan:
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"memory pool: negative dimension in shape {dims}")
        itemsize = dtype.itemsize
        nbytes = math.prod(dims) * itemsize
        bucket = bisect.bisect_left(self.sizes, nbytes)
        if bucket == len(self.sizes):
            raise ValueError(f"memory pool: a buffer of {nbytes} bytes is beyond the largest bucket")
        top = -(-nbytes // ALIGN) * ALIGN if self.exact else self.sizes[bucket]
        cap_elems = -(-top // itemsize)
        dev = resolve_device(device)
        # "cuda" without an index follows torch.cuda.set_device, so it is resolved per call.
        per_call_device = dev.type == "cuda" and torch.device(device).index is None
        keys = None if dev.type == "cuda" else ((dev, dtype, bucket, 0, False), (dev, dtype, bucket, 0, True))
        plan = RequestPlan(
            strides=contiguous_strides(dims),
            nbytes=nbytes,
            cap_elems=cap_elems,
            cap_bytes=cap_elems * itemsize,
            bucket=bucket,
            device=None if per_call_device else dev,
            keys=keys,
        )
        if len(self.plans) >= _PLAN_MEMO_MAX:  # shapes that never repeat must not grow it forever
            self.plans.clear()
        self.plans[(shape, dtype, device)] = plan
        return plan
