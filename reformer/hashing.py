"""Angular locality-sensitive hashing (Andoni et al. 2015), as used by Reformer.

A vector ``x`` is projected by a random rotation ``R`` (``d x n/2``) and assigned the
bucket ``argmax([xR ; -xR])``: nearby directions land in the same bucket with high
probability. ``n_hashes`` independent rotations give ``n_hashes`` rounds.

For large bucket counts a *factorised* count ``(n1, n2)`` hashes with two independent
rotation blocks and combines them mixed-radix, first factor most significant:
``bucket = b1 * n2 + b2`` (``n1 * n2`` buckets from ``n1/2 + n2/2`` projections).

Rotations are drawn fresh from torch's global RNG in training (so a reversible
recompute replays them by restoring the RNG state) and from a fixed per-layer seed in
eval mode, which makes eval forwards deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch

from .native import kernels as cpu_kernels
from .native.workers import l2_cache_bytes, run_parts, split_among_workers

BucketSpec = int | tuple[int, ...]


def validate_n_buckets(n_buckets: BucketSpec | Sequence[int], name: str = "n_buckets") -> BucketSpec:
    """Return ``n_buckets`` normalised (int or tuple of ints), or raise a clear ValueError."""
    if isinstance(n_buckets, int) or not isinstance(n_buckets, Sequence) or isinstance(n_buckets, str):
        factors = (n_buckets,)
    else:
        factors = tuple(n_buckets)
    if not factors or any(isinstance(f, bool) or not isinstance(f, int) for f in factors):
        raise ValueError(f"{name} must be an even int >= 2 or a tuple of them, got {n_buckets!r}")
    for f in factors:
        if f < 2 or f % 2:
            raise ValueError(f"{name} must be even and >= 2 (each factor), got {n_buckets!r}")
    return factors[0] if isinstance(n_buckets, int) else factors


def total_buckets(n_buckets: BucketSpec) -> int:
    """Number of distinct bucket ids of a (possibly factorised) bucket spec."""
    if isinstance(n_buckets, int):
        return n_buckets
    total = 1
    for f in n_buckets:
        total *= f
    return total


def buckets_for_length(length: int, bucket_size: int) -> int:
    """Default bucket count for sequences of ``length``: ``length // bucket_size``, even, >= 2."""
    n = max(2, length // bucket_size)
    return n + (n % 2)


def draw_rotations(
    dim: int,
    n_hashes: int,
    n_buckets: BucketSpec,
    n_sets: int = 1,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random rotations of shape ``(n_sets, dim, n_hashes, sum(factors) // 2)``.

    ``seed=None`` draws from torch's global RNG on ``device`` (training); an int seed
    draws from a private CPU generator, so the result is the same on every device and
    independent of the global RNG (eval).
    """
    factors = (n_buckets,) if isinstance(n_buckets, int) else n_buckets
    shape = (n_sets, dim, n_hashes, sum(factors) // 2)
    if seed is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return seeded_normal(seed, list(shape)).to(device=device, dtype=dtype)


@torch.library.custom_op("reformer::seeded_normal", mutates_args=())
def seeded_normal(seed: int, shape: list[int]) -> torch.Tensor:
    """Standard normal float32 numbers of ``shape`` on CPU from a private generator seeded with
    ``seed``. An operator, so that ``torch.compile`` keeps it in its graph (Dynamo cannot trace a
    ``torch.Generator``)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@seeded_normal.register_fake
def _(seed: int, shape: list[int]) -> torch.Tensor:
    return torch.empty(shape)


#: Elements of the rotated-vector buffer per hashing step. The projections have
#: ``len x n_buckets / 2`` entries per round (quadratic in length when ``n_buckets`` grows
#: with it), so inputs are hashed a block of rows and positions at a time, small enough to
#: stay in cache (1.8x faster on CPU at 16K tokens than 64 MB blocks, which also cost page
#: faults). With a 2 MB L2, 2^20 (4 MB) beat 2^18: 4K 10.8 -> 6.6 ms, 16K 69 -> 57 ms, 64K
#: 987 -> 777 ms for 8 heads and 4 rounds.
HASH_BLOCK_ELEMENTS = 2**20 if l2_cache_bytes() >= 2**20 else 2**18


def hash_vectors(
    x: torch.Tensor, rotations: torch.Tensor, n_buckets: BucketSpec, *, first_major: bool = True
) -> torch.Tensor:
    """Bucket ids of ``x`` (``(rows, len, d)``) for every round: ``(rows, n_hashes, len)`` int64.

    ``rotations`` is ``(n_sets, d, n_hashes, r)`` from :func:`draw_rotations`; row ``i``
    uses set ``i % n_sets`` (rows are ``(batch, head)`` flattened, head fastest).
    A factorised id has the first factor as its most significant digit, or with
    ``first_major=False`` as its least significant one (Hugging Face's order).
    """
    x = x.detach()  # ids are discrete: no gradient (and the out= matmul below refuses one)
    rows, length, d = x.shape
    n_sets, _, n_hashes, width = rotations.shape
    if rows % n_sets:
        raise ValueError(f"rows ({rows}) must be a multiple of the rotation sets ({n_sets})")
    factors = (n_buckets,) if isinstance(n_buckets, int) else n_buckets
    rotations = rotations.to(x.dtype).reshape(n_sets, d, n_hashes * width)
    groups = rows // n_sets
    xs = x.reshape(groups, n_sets, length, d)
    out = torch.empty(groups, n_sets, n_hashes, length, dtype=torch.long, device=x.device)
    per_position = n_sets * n_hashes * width  # projections of one position of one row group
    if torch.compiler.is_compiling():  # one block: Inductor tiles by itself, and no loop depends on the length
        step, group_step, blocks = length, groups, [(0, 0)]
    else:
        step = min(length, max(1, HASH_BLOCK_ELEMENTS // per_position))
        group_step = max(1, HASH_BLOCK_ELEMENTS // (step * per_position))
        blocks = [(g, start) for g in range(0, groups, group_step) for start in range(0, length, step)]

    fused = cpu_kernels.available(x)  # fp32 on CPU: the argmax is one pass of a C kernel

    def hash_blocks(mine: range) -> None:
        # One projection buffer and one match buffer for all of a part's blocks: fresh ones per
        # block would each pay page faults on CPU.
        size = group_step * step * per_position
        scratch = Scratch(x.new_empty(size), None if fused else x.new_empty(size, dtype=torch.float32))
        for g, start in (blocks[i] for i in mine):
            x_block = xs[g : g + group_step, :, start : start + step]  # (gb, s, lb, d)
            gb, _, lb, _ = x_block.shape
            # (gb, s, lb, d) @ (s, d, h * r) -> (gb, s, lb, h, r): the matmul's own layout, no permute
            rotated = scratch.projections[: gb * lb * per_position].view(gb, n_sets, lb, -1)
            torch.matmul(x_block, rotations, out=rotated)
            ids = _bucket_ids(rotated.view(gb, n_sets, lb, n_hashes, width), factors, first_major, scratch.matches)
            out[g : g + group_step, :, :, start : start + step] = ids.transpose(-1, -2)

    # blocks write disjoint ids
    run_parts([partial(hash_blocks, mine) for mine in split_among_workers(len(blocks), x.device)])
    return out.view(rows, n_hashes, length)


def top_bucket_ids(x: torch.Tensor, rotations: torch.Tensor, n_buckets: int, n_hashes: int) -> torch.Tensor:
    """``reformer_pytorch``'s ``rehash_each_round=False``: one rotation, and each position goes
    to its ``n_hashes`` best buckets, one per round, from the ``n_hashes``-th best (round 0) to
    the best (the last round), as the peer's ascending sort orders them.

    ``x`` ``(rows, len, d)``; ``rotations`` ``(n_sets, d, 1, n_buckets // 2)``. Returns
    ``(rows, n_hashes, len)`` int64."""
    x = x.detach()
    rows, length, d = x.shape
    n_sets = rotations.shape[0]
    if rows % n_sets:
        raise ValueError(f"rows ({rows}) must be a multiple of the rotation sets ({n_sets})")
    rotated = x.reshape(rows // n_sets, n_sets, length, d) @ rotations[:, :, 0].to(x.dtype)  # (g, s, len, nb/2)
    both = torch.cat([rotated, -rotated], dim=-1)  # (g, s, len, n_buckets)
    best = both.topk(n_hashes, dim=-1).indices.flip(-1)  # (g, s, len, n_hashes), best last
    return best.reshape(rows, length, n_hashes).transpose(1, 2)


class Scratch(NamedTuple):
    projections: torch.Tensor  # flat, a block's projections
    matches: torch.Tensor | None  # flat float32, at least as large; None: the CPU kernel finds the argmax


def _bucket_ids(
    rotated: torch.Tensor, factors: tuple[int, ...], first_major: bool, matches: torch.Tensor | None
) -> torch.Tensor:
    """Bucket ids from the projections ``(..., sum(factors) // 2)`` of each vector (``matches``:
    flat float32 scratch space of at least as many elements, or None for the CPU kernel)."""
    buckets = None
    offset, radix = 0, 1
    for f in factors:
        ids = _argmax_of_both_signs(rotated[..., offset : offset + f // 2], matches)
        offset += f // 2
        if buckets is None:
            buckets = ids
        else:
            buckets = buckets * f + ids if first_major else buckets + ids * radix
        radix *= f
    return buckets


_INDEX_AND_COUNT: dict[int, torch.Tensor] = {}  # (2, r): rows arange(r), ones(r)


def _argmax_of_both_signs(part: torch.Tensor, matches: torch.Tensor | None) -> torch.Tensor:
    """``argmax([part, -part], dim=-1)`` (first index on ties) without building it: the larger of
    the top projection and the negated bottom one, the first half on a tie."""
    if matches is None:
        return cpu_kernels.argmax_both_signs(part)
    if part.device.type == "cpu" and not torch.compiler.is_compiling():  # (its tie check reads a value)
        return _argmax_of_both_signs_by_matching(part, matches)
    return _argmax_of_both_signs_by_max_min(part)


def _argmax_of_both_signs_by_max_min(part: torch.Tensor) -> torch.Tensor:
    top, top_idx = part.max(dim=-1)
    bottom, bottom_idx = part.min(dim=-1)
    return torch.where(top >= -bottom, top_idx, bottom_idx + part.shape[-1])


def _argmax_of_both_signs_by_matching(part: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """The same on CPU, where ``max(dim)`` with indices is a scalar loop: find the winning value
    with vectorised ``amax``/``amin``, then its index by matching it - a 0/1 float match times
    ``[arange, 1]`` gives the index and the number of matches in one small matmul (exact
    integers), ~4x faster. Rows matched more than once (ties, zero vectors) or never (NaN)
    take the general path."""
    r = part.shape[-1]
    top, bottom = part.amax(dim=-1, keepdim=True), part.amin(dim=-1, keepdim=True)
    positive = top >= -bottom
    match = matches[: part.numel()].view(part.shape)
    torch.eq(part, torch.where(positive, top, bottom), out=match)
    if r not in _INDEX_AND_COUNT:
        _INDEX_AND_COUNT[r] = torch.stack([torch.arange(r, dtype=torch.float32), torch.ones(r)])
    # as a linear layer (a (2, r) weight): several times faster than ``@`` a (r, 2) matrix here
    index, count = torch.nn.functional.linear(match, _INDEX_AND_COUNT[r]).long().unbind(-1)  # (...,) each
    ids = index + torch.where(positive[..., 0], 0, r)
    unclear = count != 1
    if bool(unclear.any()):
        ids[unclear] = _argmax_of_both_signs_by_max_min(part[unclear])
    return ids
