"""Block-sparse patterns: which (query block, key block) pairs are computed, and the dense mask.

The sequence is cut into blocks of ``block_size`` tokens (the last one may be shorter).
Query block i sees key block j (before any causal mask) when any of these holds:

- local:  |i - j| <= local_blocks (so a block always sees itself);
- dilated: dilation >= 1 and (i - j) mod dilation == 0 (every dilation-th block, counted from
  the query block, as in the Sparse Transformer's strided pattern); dilation = 0 turns it off;
- global: j < global_blocks (everyone sees the first blocks) or i < global_blocks (the first
  blocks see everyone; under a causal mask they are then limited to earlier keys anyway).

The relation is symmetric, and every key in a visited block is allowed: the token-level
multiplicity is 0/1, identical for every head.

``sparsity``: when set, it replaces ``dilation``. It is the target fraction of (query block,
key block) pairs that are skipped, counted without the causal mask (0 = dense). The stride is
picked per sequence length, among "off" and 1..num_blocks, as the one whose sparsity is closest
to the target (the sparser one on a tie); local and global blocks stay as configured, so a
target beyond what they allow gives dilation off. ``achieved_sparsity(n)`` says what was got.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dilexp.errors import ConfigError

# More buckets cut padding further but each one is another kernel call; past four the
# padding left is a few percent for the layouts here (causal rows grow linearly).
MAX_BUCKETS = 4
# A further bucket is only worth its extra call when it removes this much padded work.
BUCKET_GAIN = 0.10


def _as_int(field: str, value: object, minimum: int) -> int:
    # bool is an int subclass; `True` blocks is a typo, not a setting.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field, value, f"must be an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class BlockSparsePattern:
    block_size: int = 64
    local_blocks: int = 1
    dilation: int = 2
    global_blocks: int = 1
    sparsity: float | None = None

    @classmethod
    def from_config(
        cls,
        block_size: int = 64,
        local_blocks: int = 1,
        dilation: int = 2,
        global_blocks: int = 1,
        sparsity: float | None = None,
        prefix: str = "attention",
    ) -> BlockSparsePattern:
        """Validate settings; every error names its field (``attention.block_size`` ...)."""
        bs = _as_int(f"{prefix}.block_size", block_size, 1)
        local = _as_int(f"{prefix}.local_blocks", local_blocks, 0)
        dil = _as_int(f"{prefix}.dilation", dilation, 0)
        glob = _as_int(f"{prefix}.global_blocks", global_blocks, 0)
        if sparsity is not None:
            if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
                raise ConfigError(f"{prefix}.sparsity", sparsity, "must be null or a number in [0, 1)")
            sparsity = float(sparsity)
            if not 0.0 <= sparsity < 1.0:
                raise ConfigError(f"{prefix}.sparsity", sparsity, "must be in [0, 1) (fraction of block pairs skipped)")
        return cls(bs, local, dil, glob, sparsity)

    def num_blocks(self, n: int) -> int:
        return -(-n // self.block_size)

    def _pair_count(self, nb: int, dilation: int) -> int:
        """Visited block pairs (no causal mask) in closed form, so the sparsity search stays cheap."""
        g = min(self.global_blocks, nb)
        m = nb - g  # the square of non-global rows and columns
        count = nb * nb - m * m
        if m == 0:
            return count
        delta = torch.arange(-(m - 1), m)
        on = delta.abs() <= self.local_blocks
        if dilation >= 1:
            on |= delta % dilation == 0
        # m - |delta| pairs of the square lie on diagonal delta.
        return count + int(((m - delta.abs()) * on).sum())

    def resolved_dilation(self, n: int) -> int:
        """The dilated-block stride used at length ``n`` (``dilation`` unless ``sparsity`` is set)."""
        if self.sparsity is None:
            return self.dilation
        nb = self.num_blocks(n)
        target = 1.0 - self.sparsity
        best, best_gap = 0, None
        # Candidates from sparsest (off, then the widest stride) to densest, so a tie keeps the sparser.
        for d in [0, *range(nb, 0, -1)]:
            gap = abs(self._pair_count(nb, d) / (nb * nb) - target)
            if best_gap is None or gap < best_gap - 1e-12:
                best, best_gap = d, gap
        return best

    def achieved_sparsity(self, n: int) -> float:
        """Fraction of block pairs skipped at length ``n``, no causal mask."""
        nb = self.num_blocks(n)
        return 1.0 - self._pair_count(nb, self.resolved_dilation(n)) / (nb * nb)

    def block_layout(self, n: int) -> torch.Tensor:
        """(nb, nb) bool: query block i computes key block j (no causal mask)."""
        nb = self.num_blocks(n)
        i = torch.arange(nb).unsqueeze(1)
        j = torch.arange(nb).unsqueeze(0)
        delta = i - j
        layout = delta.abs() <= self.local_blocks
        d = self.resolved_dilation(n)
        if d >= 1:
            layout = layout | (delta % d == 0)
        g = self.global_blocks
        return layout | (i < g) | (j < g)

    def dense_mask(self, n: int) -> torch.Tensor:
        """(N, N) bool token-level mask (no causal mask)."""
        blk = torch.arange(n) // self.block_size
        return self.block_layout(n)[blk[:, None], blk[None, :]]

    def dense_multiplicity(self, n: int, num_heads: int) -> torch.Tensor:
        """(H, N, N) int64 0/1: the oracle's mask, the same for every head."""
        return self.dense_mask(n).to(torch.int64).unsqueeze(0).expand(num_heads, n, n).contiguous()

    def multiplicity_rows(self, n: int, num_heads: int, head: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one head's multiplicity, (stop - start, N) int64, without the N x N mask."""
        blk = torch.arange(n) // self.block_size
        return self.block_layout(n)[blk[start:stop, None], blk[None, :]].to(torch.int64)

    def allowed_pairs(self, n: int, causal: bool) -> int:
        """Allowed query-key pairs of one head, from the block layout (no dense mask: any N)."""
        layout = self.block_layout(n)
        nb = layout.shape[0]
        sizes = torch.full((nb,), self.block_size, dtype=torch.int64)
        sizes[-1] = n - (nb - 1) * self.block_size
        area = sizes[:, None] * sizes[None, :]
        if causal:
            # Below the diagonal every pair counts; on it, the lower triangle with the diagonal.
            area = torch.tril(area, diagonal=-1) + torch.diag(sizes * (sizes + 1) // 2)
        return int((area * layout).sum())

    def plan(self, n: int, causal: bool) -> BlockPlan:
        """What the kernel computes at length ``n``: see ``BlockPlan``."""
        return build_plan(self.block_layout(n), n, self.block_size, causal)


# A plan is stored as plain tuples of tensors so that every cache strategy can move it
# between devices and count its bytes without knowing its type.
BlockBucket = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]
BlockPlan = tuple[torch.Tensor | None, torch.Tensor | None, tuple[BlockBucket, ...]]


def bag_index(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets) that turn the scatter-add ``zeros(size, X).index_add_(0, index, g)``
    into ``embedding_bag(order, g, offsets, mode="sum")``: a gather-sum.

    The backward of a gather is a scatter-add, and index_add_ on CPU is several times
    slower than embedding_bag's gather-sum (measured in the block_sparse benchmark).
    """
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=size)
    offsets = torch.cumsum(counts, 0) - counts
    return order, offsets


def _split_rows(counts: torch.Tensor) -> list[int]:
    """Bucket boundaries over rows sorted by key-block count, minimising padded work.

    Each bucket is padded to its largest count. An exact DP over contiguous splits of the
    sorted counts (at most MAX_BUCKETS); more buckets are taken only while they pay.
    """
    c = counts.tolist()
    nr = len(c)
    inf = float("inf")
    # best[k][j]: least padded work covering rows [0, j) with k buckets; cut[k][j]: last split.
    best = [[inf] * (nr + 1) for _ in range(MAX_BUCKETS + 1)]
    cut = [[0] * (nr + 1) for _ in range(MAX_BUCKETS + 1)]
    best[0][0] = 0.0
    for k in range(1, MAX_BUCKETS + 1):
        for j in range(1, nr + 1):
            top = c[j - 1]  # sorted, so the last row of a bucket has its largest count
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (j - i) * top
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    finest = min(best[k][nr] for k in range(1, MAX_BUCKETS + 1))
    k = 1
    while best[k][nr] > finest * (1 + BUCKET_GAIN):
        k += 1
    bounds, j = [nr], nr
    for kk in range(k, 0, -1):
        j = cut[kk][j]
        bounds.append(j)
    return bounds[::-1]


def build_plan(layout: torch.Tensor, n: int, block_size: int, causal: bool) -> BlockPlan:
    """Turn a (nb, nb) block layout into gather indices and token masks for batched attention.

    Rows are grouped into buckets by how many key blocks they need, so that a few global
    rows do not pad every other row to the full sequence. Returns ``(perm, inv, buckets)``:
    ``perm`` (nb,) the query blocks in bucket order and ``inv`` its inverse (both None when
    that is block order). Each bucket is ``(rows, cols, mask, bag_order, bag_offsets)``:
    ``rows`` (R,) its query blocks, ``cols`` (R, K) the key blocks each one gathers (padded
    with the row's own block), ``mask`` (R, block_size, K * block_size) bool, or None when
    everything is allowed, and ``bag_index(cols.flatten(), nb)`` for the backward.
    """
    nb = layout.shape[0]
    if causal:
        layout = torch.tril(layout)
    counts = layout.sum(dim=1)
    order = torch.sort(counts, stable=True).indices
    bounds = _split_rows(counts[order])
    buckets = []
    offs = torch.arange(block_size)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if lo == hi:
            continue
        # Block order inside a bucket: a single bucket then needs no reordering at all.
        rows = torch.sort(order[lo:hi]).values
        sub = layout[rows]  # (R, nb)
        width = int(sub.sum(dim=1).max())
        # Allowed blocks first, in block order: sort on (not allowed, index).
        key = (~sub).to(torch.int64) * nb + torch.arange(nb)
        cols = torch.sort(key, dim=1).values[:, :width] % nb
        slot_ok = torch.gather(sub, 1, cols)
        cols = torch.where(slot_ok, cols, rows[:, None])
        q_pos = rows[:, None] * block_size + offs[None, :]  # (R, bs)
        k_pos = (cols[:, :, None] * block_size + offs[None, None, :]).flatten(1)  # (R, K*bs)
        ok = slot_ok.repeat_interleave(block_size, dim=1) & (k_pos < n)
        mask = ok[:, None, :].expand(-1, block_size, -1)
        if causal:
            mask = mask & (k_pos[:, None, :] <= q_pos[:, :, None])
        mask = None if bool(mask.all()) else mask.contiguous()
        buckets.append((rows.contiguous(), cols.contiguous(), mask, *bag_index(cols.flatten(), nb)))
    perm = torch.cat([b[0] for b in buckets])
    if torch.equal(perm, torch.arange(nb)):
        return None, None, tuple(buckets)
    return perm, torch.argsort(perm), tuple(buckets)
