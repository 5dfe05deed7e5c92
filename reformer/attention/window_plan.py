"""The window plan of chunked LSH attention: which keys each window holds, which of them each
of its queries sees (the masks), and how the windows are cut into blocks.

Layout: the sorted slots of :mod:`reformer.attention.slots` (shared with the GPU backends).
Window ``j`` of a batch row holds the ``s`` query slots ``[j*s, j*s + s)`` and the ``c + s``
key slots ``[j*s - c, j*s + s)``: the ``c`` slots before its queries and its own, the first
window wrapping to the row's last ``c`` slots (trax / HF). With ``s = c`` that is the classic
(previous chunk, own chunk) window. Strict causal attention only ever looks ``c`` slots
back, so it uses ``s = c / 2`` (:func:`queries_per_window`): windows of ``3c/2`` keys
instead of ``2c``, a quarter fewer logits for the same result.

Per-slot tables are ``(b, total)`` in query order or ``(b, c + total)`` in ``ext`` order (the
row's last ``c`` slots first, :func:`with_wrap`). Work is done in blocks of consecutive windows
(:data:`WINDOW_BLOCK_ELEMENTS` logits at a time, small enough to stay in cache); a block's key
run is one contiguous run of ext slots, its windows strided views of it, and its masks are
built from contiguous views of the tables, O(block) work.

Masks (:meth:`WindowPlan.mask_`):
* non-causal, and ``causal`` with ``strict_causal=False`` (classic, trax / HF): every key
  in the two-chunk window, minus future keys when causal.
* ``causal`` with ``strict_causal=True``: a query sees the at most ``bucket_size`` keys of
  its own bucket that precede it in sorted order in the same round (plus itself). That set
  depends on earlier positions only, so no future token can change an earlier output. In
  slot terms it is one interval per query, ``[slot - span, slot]``, so its mask is a row of a
  fixed table of masks, one per (span, place in the window) (:func:`strict_hidden_table`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from ..native import kernels as cpu_kernels
from ..native.workers import l2_cache_bytes, split_among_workers
from .common import SELF_ATTN_VALUE, dropout_keep, masked_value, self_logit
from .common import dropout_seed as draw_dropout_seed
from .slots import SlotLayout

if TYPE_CHECKING:  # (options.py imports the backends, which import this module)
    from .options import LSHOptions

#: Logits computed at once per block of windows (``windows * s * (c + s)``): small enough
#: that a block's logits and keys stay in cache, large enough that per-block overhead does
#: not matter. Measured at 16K tokens: with a 512 KB L2, 2^17 (2^16 and 2^18 5-9% slower);
#: with a 2 MB L2, 2^18 (2^17 and 2^19 4-8% slower).
WINDOW_BLOCK_ELEMENTS = 2**18 if l2_cache_bytes() >= 2**20 else 2**17


def queries_per_window(bucket_size: int, strict: bool) -> int:
    """``s``: queries per window. Strict causal windows need only the ``c`` slots before each
    query, so half-chunk windows (``3c/2`` keys) cover them; other modes see whole chunks."""
    return bucket_size // 2 if strict and bucket_size % 2 == 0 else bucket_size


def with_wrap(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(b, total, ...)`` -> ``(b, c + total, ...)``: each row's last ``c`` slots in front, so
    the first chunk's predecessor (the last chunk, as in trax / HF) precedes it."""
    return torch.cat([x[:, -c:], x], dim=1)


def key_windows(ext: torch.Tensor, s: int, width: int) -> torch.Tensor:
    """Strided view ``(b, n, width, ...)`` of ``ext`` ``(b, rows, ...)``: window ``j`` is rows
    ``[j*s, j*s + width)`` (overlapping, no copy)."""
    b, rows = ext.shape[:2]
    n = (rows - width) // s + 1
    st = ext.stride()
    return ext.as_strided((b, n, width, *ext.shape[2:]), (st[0], s * st[1], st[1], *st[2:]))


class WindowDropout(NamedTuple):
    """Attention dropout of a call (:func:`reformer.attention.common.dropout_keep`): a query's
    entry for a key is kept by a hash of ``(seed, stream, query position, key position)``, so
    it does not depend on where the sort put them (strict causality holds in training too)."""

    p: float
    seed: torch.Tensor  # () int64
    stream: torch.Tensor  # (b, total) batch row * rounds + round of each query slot
    ext_pos: torch.Tensor  # (b, c + total) position of each ext slot


class WindowPairs(NamedTuple):
    """A call's mask of query-key pairs (``reformer_pytorch``'s ``input_attn_mask``)."""

    allowed: torch.Tensor  # (b, lp * lp) bool: query position i may attend key position j at i * lp + j
    ext_pos: torch.Tensor  # (b, c + total) position of each ext slot


class Block(NamedTuple):
    """Windows ``start:end`` (flat index): batch rows ``rows``, windows ``j0:j1`` of each row.
    A block lies within one row, or is made of whole rows (``j0 = 0, j1 = n``)."""

    start: int
    end: int
    rows: slice
    j0: int
    j1: int


@dataclass
class WindowPlan:
    """Which keys each window holds and which of them each of its queries sees.

    Windows are ordered ``(batch row, j)``; tables are in query or ext order (see the module doc).
    """

    c: int  # chunk (bucket) size
    s: int  # queries per window
    lp: int  # padded length (slots per round)
    slot_row: torch.Tensor  # (b, total) row of each slot in the flattened (b * lp) inputs
    ext_row: torch.Tensor  # (b, c + total) the same in ext order
    round_slot: torch.Tensor  # (b, h, lp) flat (b * total) index of each position's slot per round
    strict: bool
    span_row: torch.Tensor | None  # strict: (b, total) each query slot's row of the strict mask table
    slot_pos: torch.Tensor | None  # classic: (b, c + total) position of each ext slot
    slot_group: torch.Tensor | None  # attend_across_buckets=False: (b, c + total) round * buckets + bucket
    causal: bool
    key_valid: torch.Tensor | None  # (b, c + total) bool, True = attendable
    dup_info: torch.Tensor | None  # (b, c + total, h, 2) per-round rank/chunk and bucket, for -log N
    self_attn_value: float = SELF_ATTN_VALUE  # logit of a query's own key
    exp_lse_softmax: bool = False  # weights as exp(x - logsumexp(x)) (trax / HF) instead of softmax
    kernels: bool = False  # fp32 on CPU: the row kernels of native/kernels.c do the row work
    fused: bool = False  # and the fused window kernels the strict windows' matmuls too
    dropout: WindowDropout | None = None  # attention dropout in training
    pairs: WindowPairs | None = None  # the call's query-key pair mask

    @property
    def width(self) -> int:
        return self.c + self.s

    @property
    def rows(self) -> int:
        return self.slot_row.shape[0]

    @property
    def n(self) -> int:
        """Windows per batch row."""
        return self.slot_row.shape[1] // self.s

    @property
    def n_windows(self) -> int:
        return self.rows * self.n

    def parts(self, device: torch.device) -> list[range]:
        """Batch rows split among the CPU workers (:mod:`reformer.cpu_workers`): blocks of
        different rows read and write different rows of the inputs and their gradients."""
        return split_among_workers(self.rows, device)

    def blocks(self, rows: range) -> list[Block]:
        size = max(1, WINDOW_BLOCK_ELEMENTS // (self.s * self.width))
        n = self.n
        if size >= n:  # whole rows
            step = size // n
            return [
                Block(r * n, min(r + step, rows.stop) * n, slice(r, min(r + step, rows.stop)), 0, n)
                for r in range(rows.start, rows.stop, step)
            ]
        return [
            Block(r * n + j, r * n + min(j + size, n), slice(r, r + 1), j, min(j + size, n))
            for r in rows
            for j in range(0, n, size)
        ]

    def query_slots(self, table: torch.Tensor, blk: Block) -> torch.Tensor:
        """The block's query slots ``(rows, m * s, ...)`` of a ``(b, total, ...)`` per-slot table."""
        return table[blk.rows, blk.j0 * self.s : blk.j1 * self.s]

    def key_run(self, table: torch.Tensor, blk: Block) -> torch.Tensor:
        """The block's key run ``(rows, m * s + c, ...)`` of a ``(b, c + total, ...)`` ext table."""
        return table[blk.rows, blk.j0 * self.s : blk.j1 * self.s + self.c]

    def windows(self, run: torch.Tensor) -> torch.Tensor:
        """``(rows, m * s + c, ...)`` key run -> ``(m * rows, c + s, ...)`` windows (a view for one
        row, a copy for several)."""
        return key_windows(run, self.s, self.width).flatten(0, 1)

    def take(self, table: torch.Tensor, blk: Block) -> torch.Tensor:
        """The block's windows ``(blk, c + s, ...)`` of a ``(b, c + total, ...)`` ext table."""
        return self.windows(self.key_run(table, blk))

    def self_mask(self, blk: Block) -> torch.Tensor | None:
        """``(blk, s, c + s)`` True at each query's own key; None in strict mode, where it is the
        fixed entry ``(i, c + i)``."""
        if self.strict:
            return None
        k_pos = self.take(self.slot_pos, blk)[:, None, :]  # (blk, 1, c + s)
        return k_pos[:, :, self.c :].transpose(1, 2) == k_pos  # a window's queries are its last s keys

    def fill_self_(self, x: torch.Tensor, value: float, is_self: torch.Tensor | None) -> None:
        """Set each query's own-key entry of ``x`` ``(blk, s, c + s)`` to ``value`` (strict mode: the
        strided diagonal ``(i, c + i)``)."""
        if is_self is None:
            x.view(x.shape[0], -1)[:, self.c :: self.width + 1].fill_(value)
        else:
            x.masked_fill_(is_self, value)

    def mask_(self, dots: torch.Tensor, blk: Block, strict_part: bool = True) -> None:
        """Apply the masks and self logits to a block's ``dots`` ``(blk, s, c + s)`` in place;
        without ``strict_part``, leave out the strict window mask and the own-key logit (the
        strict softmax kernel applies those)."""
        hidden = None

        def hide(extra: torch.Tensor) -> None:
            nonlocal hidden
            hidden = extra if hidden is None else hidden | extra

        if self.key_valid is not None:
            hide(~self.take(self.key_valid, blk)[:, None, :])
        if self.strict and strict_part:  # rows of a fixed table: much cheaper than comparisons
            rows = self.query_slots(self.span_row, blk).flatten()
            hide(strict_hidden_table(self.c, self.s, dots.device).index_select(0, rows).view_as(dots))
        elif not self.strict:
            k_pos = self.take(self.slot_pos, blk)[:, None, :]  # (blk, 1, c + s)
            if self.causal:
                hide(k_pos > k_pos[:, :, self.c :].transpose(1, 2))
            if self.slot_group is not None:
                k_group = self.take(self.slot_group, blk)[:, None, :]
                hide(k_group[:, :, self.c :].transpose(1, 2) != k_group)
        if self.pairs is not None:
            hide(~self._allowed_pairs(blk))
        if self.dup_info is not None:
            k_info = self.take(self.dup_info, blk)  # (blk, c + s, h, 2)
            dots -= self._duplicate_counts(k_info[:, self.c :], k_info).clamp_min(1).double().log().to(dots.dtype)
        if hidden is not None:
            dots.masked_fill_(hidden, masked_value(dots.dtype))
        if strict_part or not self.strict:
            self.fill_self_(dots, self_logit(dots.dtype, self.self_attn_value), self.self_mask(blk))

    def kept_by_dropout(self, blk: Block) -> torch.Tensor:
        """``(blk, s, c + s)`` bool: the entries of the block's windows that dropout keeps."""
        drop = self.dropout
        k_pos = self.take(drop.ext_pos, blk)  # (blk, c + s); a window's queries are its last s keys
        stream = self.query_slots(drop.stream, blk).reshape(-1, self.s, 1)  # (blk, s, 1)
        return dropout_keep(drop.seed, drop.p, stream, k_pos[:, self.c :, None], k_pos[:, None, :])

    def _allowed_pairs(self, blk: Block) -> torch.Tensor:
        """``(blk, s, c + s)`` bool: the entries whose (query, key) positions the pair mask allows."""
        k_pos = self.take(self.pairs.ext_pos, blk)  # (blk, c + s); a window's queries are its last s keys
        index = k_pos[:, self.c :, None] * self.lp + k_pos[:, None, :]  # (blk, s, c + s)
        allowed = self.pairs.allowed[blk.rows]  # (rows, lp * lp): a block's windows are whole rows' runs
        return allowed.gather(1, index.reshape(allowed.shape[0], -1)).view_as(index)

    def _duplicate_counts(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """How often each entry's key occurs, visibly, in all of its query's windows.

        ``q`` ``(blk, s, h, 2)``, ``k`` ``(blk, c + s, h, 2)``: per round, the rank (strict) or
        global chunk id (classic) of the position, and its bucket.
        """
        q, k = q[:, :, None], k[:, None]  # (blk, s, 1, h, 2), (blk, 1, c + s, h, 2)
        same_bucket = q[..., 1] == k[..., 1]  # (blk, s, c + s, h)
        if self.strict:
            gap = q[..., 0] - k[..., 0]
            return (same_bucket & (gap >= 0) & (gap <= self.c)).sum(-1)
        n_chunks = self.n  # classic windows are whole chunks
        q_chunk, k_chunk = q[..., 0], k[..., 0]
        q_prev = (q_chunk - 1) % n_chunks
        seen = (k_chunk == q_chunk).int() + (k_chunk == q_prev).int()
        if self.slot_group is not None:
            return (seen * same_bucket).sum(-1)
        count = seen.sum(-1)
        if k_chunk.shape[-1] > 1:  # a round's first chunk looks back into the previous round
            count = count + (k_chunk.roll(1, dims=-1) == q_prev).sum(-1)
        return count


_MASK_TABLES: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def strict_hidden_table(c: int, s: int, device: torch.device) -> torch.Tensor:
    """``((c + 1) * s, c + s)`` bool masks of strict windows: row ``span * s + i`` is False at the
    keys query ``i`` sees when ``span`` keys before it share its bucket - the ``span`` slots just
    before it, ``[c + i - span, c + i)`` - and True (hidden) elsewhere. The own key ``c + i`` is
    set separately. (A mask, not an additive table: a NaN logit of a hidden key must be replaced,
    and NaN + most negative is NaN.)"""
    key = (c, s, device)
    if key not in _MASK_TABLES:
        back = c + torch.arange(s, device=device)[:, None] - torch.arange(c + s, device=device)  # (s, c + s)
        span = torch.arange(c + 1, device=device)[:, None, None]
        visible = (back >= 1) & (back <= span)  # (c + 1, s, c + s)
        _MASK_TABLES[key] = ~visible.view(-1, c + s)
    return _MASK_TABLES[key]


def _strict_span_rows(slot_bucket: torch.Tensor, lp: int, c: int, s: int) -> torch.Tensor:
    """``(b, total)``: each slot's row of :func:`strict_hidden_table`, from its span - how many slots
    before it share its bucket within its round, at most ``c`` (buckets are contiguous runs of a
    sorted round) - and its place among its window's ``s`` queries."""
    total = slot_bucket.shape[1]
    t = torch.arange(total, device=slot_bucket.device)
    run_start = torch.ones_like(slot_bucket, dtype=torch.bool)
    run_start[:, 1:] = slot_bucket[:, 1:] != slot_bucket[:, :-1]
    run_start |= (t % lp == 0)[None]
    first = torch.where(run_start, t, 0).cummax(dim=1).values  # (b, total) first slot of each run
    return (t - first).clamp_max(c) * s + t % s


def _duplicate_info(layout: SlotLayout, strict: bool) -> torch.Tensor:
    """``(b, c + total, h, 2)`` for each ext slot's position, per round: its rank in the round
    (strict) or its global chunk id (classic), and its bucket."""
    b, h, lp = layout.inv.shape
    rounds = torch.arange(h, device=layout.inv.device)[:, None]
    rank_or_chunk = layout.inv if strict else (rounds * lp + layout.inv) // layout.c  # (b, h, lp)
    per_position = torch.stack([rank_or_chunk, layout.buckets], dim=-1).transpose(1, 2)  # (b, lp, h, 2)
    per_slot = per_position.gather(1, layout.perm.reshape(b, h * lp, 1, 1).expand(-1, -1, h, 2))  # (b, total, h, 2)
    return with_wrap(per_slot, layout.c)


def build_plan(
    layout: SlotLayout,
    options: LSHOptions,
    *,
    d: int,
    dv: int,
    n_buckets: int,
    training: bool,
    kernels: bool,
    attn_mask: torch.Tensor | None = None,
    dropout_seed: torch.Tensor | None = None,
) -> WindowPlan:
    """The plan of the windows of ``layout`` (``b`` rows of ``h`` rounds of ``lp`` slots) for
    ``d`` query/key and ``dv`` value features, with the masks, dropout and weights ``options``
    ask for; ``attn_mask`` ``(b, len, len)`` bool: the query-key pairs that may attend, or None;
    ``dropout_seed`` ``()`` int64: the attention dropout's seed (None: drawn from torch's RNG).
    ``kernels``: whether the CPU row kernels serve this call (the call's
    :class:`~.slots.CpuKernels` decision); the plan also decides whether the fused window
    kernels take its windows (:attr:`WindowPlan.fused`)."""
    causal = options.causal
    strict = causal and options.strict_causal
    dropout = options.lsh_dropout if training else 0.0
    b, h, lp = layout.inv.shape
    c, total = layout.c, layout.total
    s = queries_per_window(c, strict)
    device = layout.inv.device
    ext_pos = None  # (b, c + total) position of each ext slot, where a mask or dropout needs it
    if not strict or dropout > 0 or attn_mask is not None:
        ext_pos = with_wrap(layout.perm.reshape(b, total), c)
    slot_group = None
    if not options.attend_across_buckets and not strict:  # (strict windows hold their own bucket only)
        slot_round = torch.arange(total, device=device) // lp
        slot_group = with_wrap(layout.slot_bucket + slot_round * (n_buckets + 1), c)
    key_valid = None if layout.key_valid is None else with_wrap(layout.key_valid[layout.slot_row], c)
    dup_info = None if options.allow_duplicate_attention else _duplicate_info(layout, strict)
    round_offset = (
        torch.arange(b, device=device)[:, None, None] * total + torch.arange(h, device=device)[:, None] * lp
    )  # (b, h, 1) flat index of each round's first slot
    drop = None
    if dropout > 0:
        stream = (round_offset // lp).expand(b, h, lp).reshape(b, total)  # batch row * rounds + round
        seed = draw_dropout_seed(device) if dropout_seed is None else dropout_seed
        drop = WindowDropout(dropout, seed, stream, ext_pos)
    pairs = None
    if attn_mask is not None:  # (padding: pairs of pad positions allowed; key_valid hides those keys)
        pad = lp - attn_mask.shape[-1]
        pairs = WindowPairs(F.pad(attn_mask, (0, pad, 0, pad), value=True).reshape(b, lp * lp), ext_pos)
    # what the fused kernels take
    strict_mask_only = strict and key_valid is None and dup_info is None and drop is None and pairs is None
    return WindowPlan(
        c=c,
        s=s,
        lp=lp,
        slot_row=layout.slot_row,
        ext_row=with_wrap(layout.slot_row, c),
        round_slot=round_offset + layout.inv,
        strict=strict,
        span_row=_strict_span_rows(layout.slot_bucket, lp, c, s) if strict else None,
        slot_pos=None if strict else ext_pos,
        slot_group=slot_group,
        causal=causal,
        key_valid=key_valid,
        dup_info=dup_info,
        self_attn_value=options.self_attn_value,
        exp_lse_softmax=options.exp_lse_softmax,
        kernels=kernels,
        fused=kernels and strict_mask_only and cpu_kernels.window_tiles_fit(s, c, d, dv),
        dropout=drop,
        pairs=pairs,
    )
