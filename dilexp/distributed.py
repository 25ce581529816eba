"""Process-group helpers for context parallelism (the ring variants' sequence sharding).

Three things live here, all plain torch (nothing of Lightning or Hydra):

- starting a process group with a timeout (so a dead or hung rank turns into an error on
  the others instead of a hang), on a free localhost TCP port or a FileStore;
- the *context-parallel group*: the group across which ``ring_v2``/``ring_v3`` shard the
  sequence. It is registered explicitly (``init_context_parallel``). A ring given no group
  (``ring_group``) uses it; when none is registered but the default group has more than one
  rank, the caller is sharding by hand and the ring uses the default group (attending
  within the local shard would be a different function, silently). Data parallelism,
  where every rank holds whole sequences and a ring over the ranks would mix samples,
  says so with ``declare_data_parallel`` (the tasks do, for every hardware but cp). Under a
  (dp, cp) device mesh (``init_mesh``, torch's DeviceMesh) the cp group is the mesh's cp dimension;
- the shard layout of a length-N sequence over P parts, and sharding / unsharding of a
  (B, N, ...) tensor by it.

Shard layout (``shard_bounds``), for N positions over P parts:

- ``contiguous``: part r is one run of consecutive positions. N = P*q + e: the first e
  parts get q + 1 positions, the others q (the remainder goes to the *lowest* ranks, as in
  ``torch.tensor_split``).
- ``zigzag``: the sequence is cut the same way into 2P pieces (the first N mod 2P pieces one
  longer), and part r gets pieces r and 2P-1-r, so with a causal mask every part holds
  one early and one late piece and does about the same work.

A rank's local tensor is its positions in increasing order (for zigzag: piece r followed by
piece 2P-1-r). ``shard_positions`` gives those global positions (e.g. for positional
embeddings).
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dilexp.errors import ConfigError

PLACEMENTS = ("contiguous", "zigzag")
DEFAULT_TIMEOUT_S = 300.0

Ranges = tuple[tuple[int, int], ...]

_cp_group: dist.ProcessGroup | None = None
_cp_enabled = False
# Set by declare_data_parallel: every rank holds whole sequences, so a ring with no group runs locally.
_data_parallel = False
_timeout_s = DEFAULT_TIMEOUT_S


# -- process groups --------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (good enough for tests and one node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(
    rank: int,
    world_size: int,
    *,
    backend: str | None = None,
    init_method: str | None = None,
    store_path: str | os.PathLike[str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    context_parallel: bool = True,
) -> None:
    """Start the default process group with a timeout, and (by default) make it the cp group.

    ``backend``: nccl when CUDA is available, else gloo. Rendezvous: ``store_path`` (a
    FileStore, e.g. in pytest's tmp_path) or ``init_method`` (e.g. ``tcp://127.0.0.1:PORT``);
    with neither, the usual MASTER_ADDR/MASTER_PORT environment. ``timeout_s`` bounds every
    collective and every ring transfer: a rank that dies or hangs makes the others fail
    after at most that long.
    """
    global _timeout_s
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=float(timeout_s))
    if store_path is not None:
        store = dist.FileStore(str(Path(store_path)), world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(
            backend, init_method=init_method or "env://", rank=rank, world_size=world_size, timeout=timeout
        )
    _timeout_s = float(timeout_s)
    if context_parallel:
        init_context_parallel()


def destroy_process_group() -> None:
    """Tear down the default group and forget the cp group."""
    set_context_parallel_group(None, enabled=False)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_context_parallel(
    size: int | None = None, timeout_s: float | None = None, dedicated: bool = True
) -> dist.ProcessGroup:
    """Register this rank's context-parallel group and return it.

    ``size=None``: one group of all ranks. ``size=k``: the world is cut into groups of k
    consecutive ranks (data parallel across groups, context parallel inside each); every
    group is created on every rank, as ``new_group`` requires, and this rank's is registered.

    Call it on every rank after the default group exists (e.g. once Lightning's strategy
    has set it up): ``new_group`` is collective. ``dedicated`` (default) gives the ring its
    own communicator even when it spans the whole world, so its send/recv never interleave
    with other traffic on the default group, such as DDP's gradient all-reduce that runs
    asynchronously during the same backward pass. ``dedicated=False`` with ``size=None``
    reuses the default group.
    """
    global _timeout_s
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("init_context_parallel: no default process group; call init_process_group first")
    if timeout_s is not None:
        _timeout_s = float(timeout_s)
    world = dist.get_world_size()
    if size is None and not dedicated:
        group = dist.group.WORLD
    else:
        size = world if size is None else int(size)
        if size < 1 or world % size:
            raise ConfigError("hardware.cp_size", size, f"must divide the world size {world}")
        timeout = datetime.timedelta(seconds=_timeout_s)
        group = None
        for start in range(0, world, size):
            g = dist.new_group(ranks=list(range(start, start + size)), timeout=timeout)
            if start <= dist.get_rank() < start + size:
                group = g
    assert group is not None
    # NCCL creates communicators lazily, and a first batch_isend_irecv that not every
    # member joins (the ring skips transfers nobody needs) would wait for the absent ones.
    dist.barrier(group=group)
    set_context_parallel_group(group)
    return group


def init_mesh(dp: int, cp: int, device_type: str, timeout_s: float | None = None) -> DeviceMesh:
    """The (dp, cp) device mesh of a job, with its cp dimension registered as the ring's group.

    Built by torch's ``init_device_mesh`` on the default group (collective: every rank calls
    it). Ranks are laid out row-major, so a cp group is ``cp`` consecutive ranks (on one node
    when cp divides the devices per node, where the ring's transfers are cheapest) and a dp
    group is the ranks with the same place in their cp group. Each dimension gets its own
    communicator, so ring transfers never interleave with gradient reductions.
    """
    global _timeout_s
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("init_mesh: no default process group; call init_process_group first")
    if timeout_s is not None:
        _timeout_s = float(timeout_s)
    world = dist.get_world_size()
    if dp * cp != world:
        raise ConfigError("hardware.cp_size", cp, f"a ({dp} x {cp}) mesh needs {dp * cp} ranks, the world has {world}")
    mesh = init_device_mesh(device_type, (dp, cp), mesh_dim_names=("dp", "cp"),
                            backend_override={"dp": _own_groups(), "cp": _own_groups()})
    group = mesh.get_group("cp")
    # As in init_context_parallel: NCCL makes communicators lazily, and the ring's first
    # batch_isend_irecv may not involve every member.
    dist.barrier(group=group)
    set_context_parallel_group(group)
    return mesh


def hsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The same ranks as (replicate over cp, shard over dp), the layout FSDP2's ``fully_shard``
    takes for hybrid sharding: parameters sharded over dp, their gradients also averaged over cp."""
    dp, cp = mesh.size(0), mesh.size(1)
    ranks = mesh.mesh.view(dp, cp).t().contiguous()
    return DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("cp_replicate", "dp_shard"),
                      backend_override=(_own_groups(), _own_groups()))


def _own_groups() -> tuple[str, Any]:
    """A mesh dimension's backend and options: always its own communicators (torch's mesh would
    reuse the default group for a dimension that spans the world, and DDP's asynchronous
    all-reduce runs there during the ring's transfers), with this job's timeout."""
    backend = dist.get_backend()
    timeout = datetime.timedelta(seconds=_timeout_s)
    options: Any = None
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
    elif backend == "nccl" and hasattr(dist, "ProcessGroupNCCL"):
        options = dist.ProcessGroupNCCL.Options()
    if options is not None:
        options._timeout = timeout
    return backend, options


def set_context_parallel_group(group: dist.ProcessGroup | None, enabled: bool = True) -> None:
    """Register (or, with None, unregister) the group ring variants use by default."""
    global _cp_group, _cp_enabled, _data_parallel
    _cp_group = group
    _cp_enabled = enabled and group is not None
    _data_parallel = False


def declare_data_parallel() -> None:
    """Say that every rank of the default group holds whole sequences (no context parallelism):
    a ring variant with no group then runs single-process instead of over the default group."""
    global _data_parallel
    set_context_parallel_group(None, enabled=False)
    _data_parallel = True


def ring_group() -> dist.ProcessGroup | None:
    """The group a ring variant with no group of its own shards over.

    The registered cp group; else, unless ``declare_data_parallel`` was called, the default
    group when it has more than one rank (the caller passes each rank its shard); else None
    (single-process).
    """
    group = context_parallel_group()
    if group is not None or _data_parallel:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def context_parallel_group() -> dist.ProcessGroup | None:
    """The registered cp group, or None (ring variants then run single-process over chunks)."""
    if not _cp_enabled or not (dist.is_available() and dist.is_initialized()):
        return None
    return _cp_group


class PeerError(RuntimeError):
    """A collective failed because another rank died, hung or raised; the message names the ranks."""


def all_reduce_or_name(x: torch.Tensor, group: dist.ProcessGroup | None, what: str,
                       timeout_s: float | None = None) -> torch.Tensor:
    """``all_reduce`` (sum, in place) that turns a dead or hung peer into one PeerError line.

    Gloo says only "Connection closed by peer [address]"; this names the rank that noticed, the
    group's other ranks (the one rank that can have died when there are two) and what was
    being reduced. Gloo honours the per-wait timeout; NCCL's watchdog enforces the group's.
    """
    rank, world = group_rank_world(group)
    if world == 1:
        return x
    timeout = _timeout_s if timeout_s is None else timeout_s
    try:
        work = dist.all_reduce(x, group=group, async_op=True)
        if dist.get_backend(group) == "gloo":
            work.wait(datetime.timedelta(seconds=timeout))
        else:
            work.wait()
    except Exception as e:
        peers = [r for r in range(world) if r != rank]
        who = f"rank {peers[0]}" if len(peers) == 1 else f"one of ranks {peers}"
        raise PeerError(f"rank {rank} of {world}: {what} failed or timed out (timeout {timeout:g}s): {who} "
                        f"probably died, hung or raised before reaching it. Cause: {type(e).__name__}: "
                        f"{' '.join(str(e).split())}") from e
    return x


def transfer_timeout_s() -> float:
    """Seconds a ring transfer may wait for a peer: the timeout the group was started with."""
    return _timeout_s


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when there is no group."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup, group_rank: int) -> int:
    """The default-group rank of ``group_rank`` in ``group`` (P2P calls take global ranks)."""
    if group is dist.group.WORLD or group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


# -- shard layout ----------------------------------------------------------------------


def check_placement(placement: str, field: str = "attention.placement") -> str:
    if placement not in PLACEMENTS:
        raise ConfigError(field, placement, f"choose one of {list(PLACEMENTS)}")
    return placement


def check_shardable(n: int, parts: int, field: str = "data.seq_len") -> None:
    """Every part needs at least one position."""
    if n < parts:
        raise ConfigError(field, n, f"cannot shard {n} positions over {parts} context-parallel ranks "
                                    f"(each rank needs at least one position; use seq_len >= {parts})")


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def shard_bounds(n: int, parts: int, placement: str = "contiguous") -> list[Ranges]:
    """For each part, its global position ranges [start, stop) in local order (empty ones dropped)."""
    check_placement(placement)
    if parts < 1:
        raise ConfigError("attention.world_size", parts, "must be >= 1")
    if placement == "contiguous" or parts == 1:
        return [((a, b),) if b > a else () for a, b in _split(n, parts)]
    pieces = _split(n, 2 * parts)
    out: list[Ranges] = []
    for r in range(parts):
        chosen = (pieces[r], pieces[2 * parts - 1 - r])
        out.append(tuple((a, b) for a, b in chosen if b > a))
    return out


def ranges_len(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def shard_positions(n: int, rank: int, world: int, placement: str = "contiguous") -> torch.Tensor:
    """Global positions (int64, increasing) of ``rank``'s shard."""
    ranges = shard_bounds(n, world, placement)[rank]
    if not ranges:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in ranges])


def shard_sequence(
    x: torch.Tensor, rank: int, world: int, placement: str = "contiguous", dim: int = 1
) -> torch.Tensor:
    """``rank``'s shard of ``x`` along ``dim`` (the sequence dimension; 1 for (B, N, ...))."""
    n = x.shape[dim]
    check_shardable(n, world)
    pieces = [x.narrow(dim, a, b - a) for a, b in shard_bounds(n, world, placement)[rank]]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard_sequence(
    local: torch.Tensor,
    global_len: int,
    group: dist.ProcessGroup | None = None,
    placement: str = "contiguous",
    dim: int = 1,
) -> torch.Tensor:
    """The full sequence from every rank's shard (all_gather; not differentiable).

    Shards may differ in length by one, and all_gather wants equal sizes, so each shard is
    padded to the longest one and the padding dropped afterwards.
    """
    group = group if group is not None else context_parallel_group()
    rank, world = group_rank_world(group)
    if world == 1:
        return local
    bounds = shard_bounds(global_len, world, placement)
    longest = max(ranges_len(r) for r in bounds)
    if local.shape[dim] != ranges_len(bounds[rank]):
        raise ValueError(f"unshard_sequence: rank {rank} holds {local.shape[dim]} positions, "
                         f"the layout of {global_len} over {world} gives it {ranges_len(bounds[rank])}")
    pad_shape = list(local.shape)
    pad_shape[dim] = longest - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad_shape)], dim=dim).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    out_shape = list(local.shape)
    out_shape[dim] = global_len
    out = local.new_empty(out_shape)
    for r, ranges in enumerate(bounds):
        offset = 0
        for a, b in ranges:
            out.narrow(dim, a, b - a).copy_(gathered[r].narrow(dim, offset, b - a))
            offset += b - a
    return out


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PLACEMENTS",
    "check_placement",
    "check_shardable",
    "PeerError",
    "all_reduce_or_name",
    "context_parallel_group",
    "declare_data_parallel",
    "ring_group",
    "destroy_process_group",
    "free_port",
    "global_rank",
    "group_rank_world",
    "hsdp_mesh",
    "init_context_parallel",
    "init_mesh",
    "init_process_group",
    "ranges_len",
    "set_context_parallel_group",
    "shard_bounds",
    "shard_positions",
    "shard_sequence",
    "transfer_timeout_s",
    "unshard_sequence",
]
