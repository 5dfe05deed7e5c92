"""Portable LSH attention: sort by bucket, split into chunks, attend within (chunk, previous).

This is the fast path on CPU (and the fallback everywhere). It computes exactly the
function of :func:`reformer.attention.reference.lsh_attention_reference`; see that module
and DESIGN.md section 3 for the contract.

Layout: the sorted slots of :mod:`reformer.attention.slots` (shared with the GPU backends).
Window ``j`` of a batch row holds the ``s`` query slots ``[j*s, j*s + s)`` and the ``c + s``
key slots ``[j*s - c, j*s + s)``: the ``c`` slots before its queries and its own, the first
window wrapping to the row's last ``c`` slots (trax / HF). With ``s = c`` that is the classic
(previous chunk, own chunk) window. Strict causal attention only ever looks ``c`` slots
back, so it uses ``s = c / 2`` (:func:`queries_per_window`): windows of ``3c/2`` keys
instead of ``2c``, a quarter fewer logits for the same result.

Work is done in blocks of consecutive windows (:data:`WINDOW_BLOCK_ELEMENTS` logits at a
time, small enough to stay in cache). Strict causal windows in fp32 on CPU instead go through
one fused C kernel call per CPU worker part for the forward and one for the backward (matmuls
in registers, softmax and gradients per window while its tiles are in cache:
:func:`_fuses_windows`); other modes use batched matmuls around the row kernels of
:mod:`reformer.native.kernels`. A block gathers one contiguous run of packed
``[q | k | v]`` rows (``ext`` order: the ``c`` slots before its queries, then its own); its
queries are the run's tail and its windows strided views of it, not copies. Gradients are
summed over the run with ``(c + s) / s`` strided adds, then added back with one
``index_add_`` per block. Nothing of the size of the sorted sequence is
built except the per-slot outputs and log-sum-exps, so temporaries stay small (on CPU, large
fresh allocations cost page faults that can take longer than the arithmetic).

Memory: one custom autograd function does the windows and the combination of rounds. When a
gradient is needed it keeps the attention probabilities (``n_hashes * len * (c + s)`` per
head: linear in the length), so the backward needs neither a second ``q k^T`` nor the masks
and softmax again; the gathered inputs are rebuilt there rather than kept. Nothing of size
``len x len`` exists unless ``return_attn=True``.

Modes:
* non-causal, and ``causal`` with ``strict_causal=False`` (classic, trax / HF): every key
  in the two-chunk window, minus future keys when causal.
* ``causal`` with ``strict_causal=True``: a query sees the at most ``bucket_size`` keys of
  its own bucket that precede it in sorted order in the same round (plus itself). That set
  depends on earlier positions only, so no future token can change an earlier output. In
  slot terms it is one interval per query, ``[slot - span, slot]``, so its mask is a row of a
  fixed table of masks, one per (span, place in the window).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch

from ..native import kernels as cpu_kernels
from ..native.workers import l2_cache_bytes, run_parts, split_among_workers
from .common import (
    SELF_ATTN_VALUE,
    dropout_keep,
    dropout_seed,
    masked_value,
    norm_floor,
    quarantine_non_finite,
    self_logit,
    unit_keys_and_norms,
)
from .slots import pad_and_sort, round_weights

#: Logits computed at once per block of windows (``windows * s * (c + s)``): small enough
#: that a block's logits and keys stay in cache, large enough that per-block overhead does
#: not matter. Measured at 16K tokens: with a 512 KB L2, 2^17 (2^16 and 2^18 5-9% slower);
#: with a 2 MB L2, 2^18 (2^17 and 2^19 4-8% slower).
WINDOW_BLOCK_ELEMENTS = 2**18 if l2_cache_bytes() >= 2**20 else 2**17


#: Windows of the fused kernels (:func:`_fuses_windows`) whose key run is gathered at once: a run
#: of ``8 * s + c`` rows (220 KB at ``c = 64``, dim_head 64) stays in cache with its transpose.
#: 4 to 16 measured the same at 4K-64K tokens with a 2 MB L2; 32 and 64 2-4% slower.
FUSED_CHUNK_WINDOWS = 8


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


class _Dropout(NamedTuple):
    """Attention dropout of a call (:func:`reformer.attention.common.dropout_keep`): a query's
    entry for a key is kept by a hash of ``(seed, stream, query position, key position)``, so
    it does not depend on where the sort put them (strict causality holds in training too)."""

    p: float
    seed: torch.Tensor  # () int64
    stream: torch.Tensor  # (b, total) batch row * rounds + round of each query slot
    ext_pos: torch.Tensor  # (b, c + total) position of each ext slot


class _Block(NamedTuple):
    """Windows ``start:end`` (flat index): batch rows ``rows``, windows ``j0:j1`` of each row.
    A block lies within one row, or is made of whole rows (``j0 = 0, j1 = n``)."""

    start: int
    end: int
    rows: slice
    j0: int
    j1: int


@dataclass
class _WindowPlan:
    """Which keys each window holds and which of them each of its queries sees.

    Windows are ordered ``(batch row, j)``. Per-slot tables are ``(b, total)`` in query
    order or ``(b, c + total)`` in ``ext`` order (the row's last ``c`` slots first); a block's
    masks are built from contiguous views of them, O(block) work.
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
    self_value: float = SELF_ATTN_VALUE  # logit of a query's own key
    exp_lse: bool = False  # weights as exp(x - logsumexp(x)) (trax / HF) instead of softmax
    kernels: bool = False  # fp32 on CPU: the fused row kernels of native/kernels.c do the row work
    dropout: _Dropout | None = None  # attention dropout in training

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
        """Batch rows split among the CPU workers (:mod:`reformer.native.workers`): blocks of
        different rows read and write different rows of the inputs and their gradients."""
        return split_among_workers(self.rows, device)

    def blocks(self, rows: range) -> list[_Block]:
        size = max(1, WINDOW_BLOCK_ELEMENTS // (self.s * self.width))
        n = self.n
        if size >= n:  # whole rows
            step = size // n
            return [
                _Block(r * n, min(r + step, rows.stop) * n, slice(r, min(r + step, rows.stop)), 0, n)
                for r in range(rows.start, rows.stop, step)
            ]
        return [
            _Block(r * n + j, r * n + min(j + size, n), slice(r, r + 1), j, min(j + size, n))
            for r in rows
            for j in range(0, n, size)
        ]

    def query_slots(self, table: torch.Tensor, blk: _Block) -> torch.Tensor:
        """The block's query slots ``(rows, m * s, ...)`` of a ``(b, total, ...)`` per-slot table."""
        return table[blk.rows, blk.j0 * self.s : blk.j1 * self.s]

    def key_run(self, table: torch.Tensor, blk: _Block) -> torch.Tensor:
        """The block's key run ``(rows, m * s + c, ...)`` of a ``(b, c + total, ...)`` ext table."""
        return table[blk.rows, blk.j0 * self.s : blk.j1 * self.s + self.c]

    def windows(self, run: torch.Tensor) -> torch.Tensor:
        """``(rows, m * s + c, ...)`` key run -> ``(m * rows, c + s, ...)`` windows (a view for one
        row, a copy for several)."""
        return key_windows(run, self.s, self.width).flatten(0, 1)

    def take(self, table: torch.Tensor, blk: _Block) -> torch.Tensor:
        """The block's windows ``(blk, c + s, ...)`` of a ``(b, c + total, ...)`` ext table."""
        return self.windows(self.key_run(table, blk))

    def self_mask(self, blk: _Block) -> torch.Tensor | None:
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

    def mask_(self, dots: torch.Tensor, blk: _Block, strict_part: bool = True) -> None:
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
            hide(_strict_hidden_table(self.c, self.s, dots.device).index_select(0, rows).view_as(dots))
        elif not self.strict:
            k_pos = self.take(self.slot_pos, blk)[:, None, :]  # (blk, 1, c + s)
            if self.causal:
                hide(k_pos > k_pos[:, :, self.c :].transpose(1, 2))
            if self.slot_group is not None:
                k_group = self.take(self.slot_group, blk)[:, None, :]
                hide(k_group[:, :, self.c :].transpose(1, 2) != k_group)
        if self.dup_info is not None:
            k_info = self.take(self.dup_info, blk)  # (blk, c + s, h, 2)
            dots -= self._duplicate_counts(k_info[:, self.c :], k_info).clamp_min(1).double().log().to(dots.dtype)
        if hidden is not None:
            dots.masked_fill_(hidden, masked_value(dots.dtype))
        if strict_part or not self.strict:
            self.fill_self_(dots, self_logit(dots.dtype, self.self_value), self.self_mask(blk))

    def kept_by_dropout(self, blk: _Block) -> torch.Tensor:
        """``(blk, s, c + s)`` bool: the entries of the block's windows that dropout keeps."""
        drop = self.dropout
        k_pos = self.take(drop.ext_pos, blk)  # (blk, c + s); a window's queries are its last s keys
        stream = self.query_slots(drop.stream, blk).reshape(-1, self.s, 1)  # (blk, s, 1)
        return dropout_keep(drop.seed, drop.p, stream, k_pos[:, self.c :, None], k_pos[:, None, :])

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


def _strict_hidden_table(c: int, s: int, device: torch.device) -> torch.Tensor:
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
    """``(b, total)``: each slot's row of :func:`_strict_hidden_table`, from its span - how many slots
    before it share its bucket within its round, at most ``c`` (buckets are contiguous runs of a
    sorted round) - and its place among its window's ``s`` queries."""
    total = slot_bucket.shape[1]
    t = torch.arange(total, device=slot_bucket.device)
    run_start = torch.ones_like(slot_bucket, dtype=torch.bool)
    run_start[:, 1:] = slot_bucket[:, 1:] != slot_bucket[:, :-1]
    run_start |= (t % lp == 0)[None]
    first = torch.where(run_start, t, 0).cummax(dim=1).values  # (b, total) first slot of each run
    return (t - first).clamp_max(c) * s + t % s


def _block_probs(plan: _WindowPlan, dots: torch.Tensor, blk: _Block, probs: torch.Tensor) -> torch.Tensor:
    """Masks ``dots`` ``(blk, s, c + s)``, writes the attention weights into ``probs`` (same
    shape, may be ``dots``) and returns the per-query log-sum-exp ``(blk, s)``."""
    if plan.kernels:
        plan.mask_(dots, blk, strict_part=False)
        if plan.strict:
            span_row = plan.query_slots(plan.span_row, blk).flatten()
            self_value = self_logit(dots.dtype, plan.self_value)
            return cpu_kernels.strict_softmax(dots, probs, span_row, plan.s, plan.c, self_value, plan.exp_lse)
        return cpu_kernels.softmax(dots, probs, plan.exp_lse)
    plan.mask_(dots, blk)
    if plan.exp_lse:  # trax / HF: exp(x - lse), not renormalised where lse is rounded
        lse = torch.logsumexp(dots, dim=-1)
        torch.exp(dots - lse[..., None], out=probs)
        return lse
    # Normalise by the sum (exact for self-only queries, where an fp32 lse near -5e4 is only
    # good to ~4e-3); lse = max(x) - log(max(p)) needs no second exponential.
    top = dots.amax(dim=-1)
    torch.softmax(dots, dim=-1, out=probs)
    return top - probs.amax(dim=-1).log()


def _gather(plan: _WindowPlan, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(r, e)`` at ``rows`` ``(a, k)`` -> ``(a, k, e)``."""
    if plan.kernels:
        return cpu_kernels.gather_rows(x, rows)
    return x.index_select(0, rows.flatten()).view(*rows.shape, x.shape[-1])


class _BlockInputs(NamedTuple):
    run: torch.Tensor  # (rows, m * s + c, 2d + dv) the block's key run of packed [q | k | v] rows
    q: torch.Tensor  # (blk, s, d) scaled queries (the run's last m * s rows)
    k: torch.Tensor  # (blk, c + s, d) unit keys of each window (strided views of the run)
    v: torch.Tensor  # (blk, c + s, dv)


def _block_inputs(plan: _WindowPlan, qkv: torch.Tensor, blk: _Block, d: int) -> _BlockInputs:
    """One gather per block: queries are the last ``m * s`` rows of the key run."""
    run = _gather(plan, qkv, plan.key_run(plan.ext_row, blk))
    q = run[:, plan.c :, :d].reshape(-1, plan.s, d)
    return _BlockInputs(run, q, plan.windows(run[..., d : 2 * d]), plan.windows(run[..., 2 * d :]))


def _add_window_grads(acc: torch.Tensor, grad: torch.Tensor, plan: _WindowPlan) -> None:
    """``acc`` ``(rows, m * s + c, e)`` (a block's key run) += ``grad`` ``(blk, c + s, e)`` of its
    windows: a window's keys are ``(c + s) / s`` consecutive groups of ``s`` run rows, so this is
    one strided add per group, not a scatter."""
    s, groups = plan.s, plan.width // plan.s
    rows, run, e = acc.shape
    m = (run - plan.c) // s
    per_group = acc.view(rows, run // s, s, e)
    grad = grad.view(rows, m, groups, s, e)
    for g in range(groups):  # window j's group g is run group j + g
        per_group[:, g : g + m] += grad[:, :, g]


def _add_block_grads(
    plan: _WindowPlan,
    grad: torch.Tensor,
    key_rows: torch.Tensor,
    run: torch.Tensor,
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
) -> None:
    """Adds a block's gradients to the ``[q | k | v]`` rows of ``grad`` ``(r, 2d + dv)`` at its key
    runs' rows ``key_rows`` ``(rows, m * s + c)`` (``run``: the block's gathered inputs, for the
    shape): ``grad_q`` ``(blk, s, d)`` of its queries (the runs' tails), ``grad_k`` and ``grad_v``
    ``(blk, c + s, .)`` of each window's keys, summed over the windows that hold each key."""
    if plan.kernels:  # in one pass, with no run-sized buffer
        cpu_kernels.window_grads_to_rows_(grad, key_rows, grad_q, grad_k, grad_v, plan.s, plan.c)
        return
    d = grad_q.shape[-1]
    acc = torch.zeros_like(run)
    acc[:, plan.c :, :d] = grad_q.view(acc.shape[0], -1, d)
    _add_window_grads(acc[..., d : 2 * d], grad_k, plan)
    _add_window_grads(acc[..., 2 * d :], grad_v, plan)
    grad.index_add_(0, key_rows.flatten(), acc.flatten(0, 1))


def _combine_rounds(
    plan: _WindowPlan,
    slot_out: torch.Tensor,
    slot_lse: torch.Tensor,
    out: torch.Tensor,
    slot_weight: torch.Tensor,
    rows: range,
) -> None:
    """Write into ``out`` ``(b, lp, dv)`` the rounds of each position of batch ``rows`` combined by
    their log-sum-exp, and into ``slot_weight`` ``(b * total,)`` every slot's round weight.
    ``slot_out`` ``(b * total, dv)`` (scaled by the weights in place), ``slot_lse`` ``(b * total,)``.
    Each slot's weighted output is added to its position's row: no gather of the outputs. (The
    fp32 kernels combine the rounds online instead, except with ``exp_lse``.)"""
    index = plan.round_slot[rows.start : rows.stop]  # (rows, h, lp) slot of each position's rounds
    total = plan.slot_row.shape[1]
    slot_weight[index] = round_weights(slot_lse[index], plan.exp_lse)
    mine = slice(rows.start * total, rows.stop * total)
    weighted = slot_out[mine].mul_(slot_weight[mine, None].to(slot_out.dtype))
    # only this part's rows, offset to them: other parts write the rest of ``out`` meanwhile
    first = rows.start * plan.lp
    part_out = out[rows.start : rows.stop].view(-1, out.shape[-1]).zero_()
    part_out.index_add_(0, plan.slot_row[rows.start : rows.stop].flatten() - first, weighted)


class _LSHWindows(torch.autograd.Function):
    """Attention of every window, block by block, and the combination of rounds.

    Inputs are the flattened, padded shared query/keys ``(b * lp, d)`` and values ``(b * lp, dv)``
    in position order; the scaled queries and unit keys are made here, packed with the values
    as ``[q | k | v]`` rows (one gather per block), and their gradients folded back into one for
    ``qk`` by hand (fewer full-size passes than autograd through the scaling and norm).
    Outputs: ``out`` ``(b, lp, dv)`` in position order; when asked for, the probabilities
    ``(windows, s, c + s)`` and the slots' round weights ``(b, total)`` (no gradient; for
    ``return_attn``).
    """

    @staticmethod
    def forward(ctx, qk, v, plan: _WindowPlan, keep_probs: bool, save: bool):
        s, d, dv, total = plan.s, qk.shape[-1], v.shape[-1], plan.slot_row.shape[1]
        qkv, norm = _pack_qkv(plan, qk, v)  # (b * lp, 2d + dv), (b * lp, 1)
        # Online (fp32 kernels, softmax round weights): each block's outputs are added to their
        # positions' rows as they come, so no per-slot outputs are kept (n_hashes x the output).
        online = plan.kernels and not plan.exp_lse
        slot_out = None if online else v.new_empty(plan.n_windows, s, dv)
        slot_lse = qk.new_empty(plan.n_windows, s)
        all_probs = qk.new_empty(plan.n_windows, s, plan.width) if save or keep_probs else None
        dropout = 0.0 if plan.dropout is None else plan.dropout.p
        out = (torch.zeros if online else torch.empty)(plan.rows, plan.lp, dv, dtype=v.dtype, device=v.device)
        slot_weight = slot_lse.new_empty(slot_lse.numel())
        top = torch.full((plan.rows * plan.lp,), -torch.inf, device=qk.device) if online else None
        total_weight = torch.zeros(plan.rows * plan.lp, device=qk.device) if online else None

        fused = online and dropout == 0 and _fuses_windows(plan, d, dv)

        def attend(rows: range) -> None:
            first = rows.start * plan.lp  # this part's rows of ``out`` (other parts write the rest)
            part_rows = slice(first, rows.stop * plan.lp)
            if online:
                part_out, part_top, part_total = out.view(-1, dv)[part_rows], top[part_rows], total_weight[part_rows]
            if fused:
                _fused_forward(plan, qkv, rows, all_probs, slot_lse, (part_out, part_top, part_total))
            else:
                for blk in plan.blocks(rows):
                    x = _block_inputs(plan, qkv, blk, d)
                    dots = torch.bmm(x.q, x.k.transpose(1, 2))  # (blk, s, c + s)
                    probs = dots if all_probs is None else all_probs[blk.start : blk.end]
                    lse = slot_lse[blk.start : blk.end]
                    lse.copy_(_block_probs(plan, dots, blk, probs))
                    if dropout > 0:  # (the backward recomputes the mask from the seed: nothing kept)
                        probs = probs * plan.kept_by_dropout(blk) / (1 - dropout)
                    if online:
                        query_rows = plan.query_slots(plan.slot_row, blk) - first
                        o = torch.bmm(probs, x.v)  # (blk, s, dv)
                        cpu_kernels.accumulate_rounds_(part_out, part_top, part_total, o, lse, query_rows)
                    else:
                        torch.bmm(probs, x.v, out=slot_out[blk.start : blk.end])
            if online:
                slots = slice(rows.start * total, rows.stop * total)
                slot_rows = plan.slot_row[rows.start : rows.stop] - first
                cpu_kernels.finish_rounds_(part_out, part_top, part_total, slot_lse.view(-1)[slots], slot_rows,
                                           slot_weight[slots])  # fmt: skip

        parts = plan.parts(qk.device)
        run_parts([partial(attend, rows) for rows in parts])
        if not online:
            combine = partial(_combine_rounds, plan, slot_out.view(-1, dv), slot_lse.view(-1), out, slot_weight)
            run_parts([partial(combine, rows) for rows in parts])
        if save:
            ctx.save_for_backward(qkv, norm, out, all_probs, slot_weight)
            ctx.plan, ctx.dropout = plan, dropout
        kept = all_probs if keep_probs else qk.new_empty(0)
        ctx.mark_non_differentiable(kept, slot_weight)
        return out, kept, slot_weight.view(plan.rows, total)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_probs, _grad_weight):
        qkv, norm, out, all_probs, slot_weight = ctx.saved_tensors
        plan, dropout, s, c = ctx.plan, ctx.dropout, ctx.plan.s, ctx.plan.c
        dv = out.shape[-1]
        d = (qkv.shape[-1] - dv) // 2
        grad_out = grad_out.to(out.dtype)
        # Through the round combination out = sum_r w_r o_r, a slot of round r gets the output
        # gradient w_r * g; its softmax backward p * (dp - sum(dp * p)) then has
        # sum(dp * p) - dlse_r = w_r * (g . out): the rounds' lse gradient folds into one shift.
        grad_flat = grad_out.reshape(-1, dv).contiguous()  # (b * lp, dv)
        g_dot_out = (grad_out * out).sum(-1).flatten()  # (b * lp,)
        weight = slot_weight.view(plan.rows, -1)  # (b, total)
        grad = torch.zeros_like(qkv)

        # (the round weights come in as they are: with ``exp_lse`` the forward runs unfused, this fused)
        fused = dropout == 0 and _fuses_windows(plan, d, dv)

        def attend_backward(rows: range) -> None:
            # only this part's rows of ``grad``, offset to them (index_add_ of reduced-precision
            # types rewrites all of its target: parts running meanwhile must not share it)
            part_grad, first = grad[rows.start * plan.lp : rows.stop * plan.lp], rows.start * plan.lp
            if fused:
                _fused_backward(plan, qkv, rows, all_probs, (grad_flat, g_dot_out), weight, part_grad)
            else:
                for blk in plan.blocks(rows):
                    query_rows, key_rows = plan.query_slots(plan.slot_row, blk), plan.key_run(plan.ext_row, blk)
                    x = _block_inputs(plan, qkv, blk, d)
                    w = plan.query_slots(weight, blk).reshape(-1, s, 1)  # (blk, s, 1)
                    go = _gather(plan, grad_flat, query_rows).view(-1, s, dv) * w  # (blk, s, dv)
                    shift = g_dot_out[query_rows.flatten()].view(-1, s, 1) * w
                    probs = all_probs[blk.start : blk.end]  # (blk, s, c + s)
                    keep = None if dropout == 0 else plan.kept_by_dropout(blk).to(probs.dtype) / (1 - dropout)
                    used = probs if keep is None else probs * keep
                    grad_v = torch.bmm(used.transpose(1, 2), go)  # (blk, c + s, dv) per window key
                    grad_dots = torch.bmm(go, x.v.transpose(1, 2))  # (blk, s, c + s)
                    if keep is not None:
                        grad_dots *= keep
                    # Hidden entries have p == 0; the own-key logit is a constant: no gradient through it.
                    if plan.kernels:
                        cpu_kernels.softmax_backward_(grad_dots, probs, shift, c, plan.strict)
                        if not plan.strict:
                            plan.fill_self_(grad_dots, 0.0, plan.self_mask(blk))
                    else:
                        grad_dots.sub_(shift).mul_(probs)
                        plan.fill_self_(grad_dots, 0.0, plan.self_mask(blk))
                    grad_q = torch.bmm(grad_dots, x.k)  # (blk, s, d)
                    grad_k = torch.bmm(grad_dots.transpose(1, 2), x.q)  # (blk, c + s, d) per window key
                    _add_block_grads(plan, part_grad, key_rows - first, x.run, grad_q, grad_k, grad_v)

        run_parts([partial(attend_backward, rows) for rows in plan.parts(qkv.device)])
        return _shared_qk_grad(plan, qkv, norm, grad, d), grad[:, 2 * d :], None, None, None


def _fuses_windows(plan: _WindowPlan, d: int, dv: int) -> bool:
    """Whether the fp32 path does its windows with ``cpu_kernels.strict_windows_forward_`` and
    ``strict_windows_backward_`` (strict causal windows with no masks beyond the strict one, of
    sizes their tiles take)."""
    fits = cpu_kernels.window_tiles_fit(plan.s, plan.c, d, dv)
    return plan.kernels and plan.strict and plan.key_valid is None and plan.dup_info is None and fits


def _fused_forward(
    plan: _WindowPlan,
    qkv: torch.Tensor,
    rows: range,
    all_probs: torch.Tensor | None,
    slot_lse: torch.Tensor,
    rounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """The forward of batch ``rows``' windows in one kernel call (probabilities into ``all_probs``
    unless it is None); ``rounds``: the part's ``(out, top, total)``, from its first row."""
    part, windows = slice(rows.start, rows.stop), slice(rows.start * plan.n, rows.stop * plan.n)
    cpu_kernels.strict_windows_forward_(
        qkv,
        plan.ext_row[part],
        plan.span_row[part],
        plan.slot_row[part] - rows.start * plan.lp,
        None if all_probs is None else all_probs[windows],
        slot_lse[windows],
        rounds,
        plan.s,
        plan.c,
        self_logit(qkv.dtype, plan.self_value),
        FUSED_CHUNK_WINDOWS,
    )


def _fused_backward(
    plan: _WindowPlan,
    qkv: torch.Tensor,
    rows: range,
    all_probs: torch.Tensor,
    grad_out: tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor,
    grad: torch.Tensor,
) -> None:
    """The backward of batch ``rows``' windows in one kernel call, added to the part's rows of
    ``grad``; ``grad_out``: the output gradient ``(b * lp, dv)`` and its product with the output
    ``(b * lp,)``; ``weight`` ``(b, total)`` the slots' round weights."""
    part, windows = slice(rows.start, rows.stop), slice(rows.start * plan.n, rows.stop * plan.n)
    first, positions = rows.start * plan.lp, slice(rows.start * plan.lp, rows.stop * plan.lp)
    cpu_kernels.strict_windows_backward_(
        qkv,
        plan.ext_row[part],
        plan.span_row[part],
        plan.slot_row[part] - first,
        weight[part],
        first,
        all_probs[windows],
        grad_out[0][positions],
        grad_out[1][positions],
        grad,
        plan.s,
        plan.c,
        FUSED_CHUNK_WINDOWS,
    )


def _row_parts(x: torch.Tensor) -> list[slice]:
    """The rows of ``x`` in one piece per CPU worker."""
    return [slice(r.start, r.stop) for r in split_among_workers(x.shape[0], x.device)]


def _pack_qkv(plan: _WindowPlan, qk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[q | k | v]`` rows ``(r, 2d + dv)`` of the scaled queries ``qk / sqrt(d)`` (cheaper than
    scaling logits), the unit keys and the values, and the norms ``(r, 1)`` of ``qk``."""
    d, dv = qk.shape[-1], v.shape[-1]
    qkv = qk.new_empty(qk.shape[0], 2 * d + dv)
    if plan.kernels:  # rows split among the CPU workers, as torch would split an op among its threads
        norm = qk.new_empty(qk.shape[0], 1)
        pack = cpu_kernels.pack_qkv_
        scale, floor = d**-0.5, norm_floor(qk.dtype)
        run_parts([partial(pack, qkv[r], norm[r], qk[r], v[r], scale, floor) for r in _row_parts(qk)])
        return qkv, norm
    torch.mul(qk, d**-0.5, out=qkv[:, :d])
    qkv[:, d : 2 * d], norm = unit_keys_and_norms(qk)
    qkv[:, 2 * d :] = v
    return qkv, norm


def _shared_qk_grad(
    plan: _WindowPlan, qkv: torch.Tensor, norm: torch.Tensor, grad: torch.Tensor, d: int
) -> torch.Tensor:
    """Gradient for ``qk`` from those of ``q = qk / sqrt(d)`` and ``k = qk / max(|qk|, floor)``
    (``qkv``, ``grad`` ``(r, 2d + dv)``, ``norm`` ``(r, 1)``, as the forward computed it):
    ``g_q / sqrt(d) + (g_k - k (k . g_k)) / |qk|``, where a norm under the floor passes
    ``g_k / floor`` (the clamp is flat there). Computed in place in ``grad``'s columns (no
    full-size temporaries); returns a view of them."""
    k, grad_q, grad_k = qkv[:, d : 2 * d], grad[:, :d], grad[:, d : 2 * d]
    floor = norm_floor(norm.dtype)
    if plan.kernels:
        fold = cpu_kernels.fold_qk_grad_
        run_parts([partial(fold, grad[r], qkv[r], norm[r], d, d**-0.5, floor) for r in _row_parts(grad)])
        return grad_q
    along_k = torch.where(norm > floor, (k * grad_k).sum(-1, keepdim=True), 0).to(grad.dtype)
    grad_k.addcmul_(k, along_k, value=-1).mul_((1 / norm.clamp_min(floor)).to(grad.dtype))
    return grad_q.mul_(d**-0.5).add_(grad_k)


def _dropout_plan(p: float, stream: torch.Tensor, lp: int, ext_pos: torch.Tensor) -> _Dropout:
    """Dropout ``p`` for slots whose rounds' streams (batch row * rounds + round) are ``stream``
    ``(b, h, 1)``; ``ext_pos`` ``(b, c + total)``: the position of each ext slot."""
    b, h, _ = stream.shape
    return _Dropout(p, dropout_seed(ext_pos.device), stream.expand(b, h, lp).reshape(b, h * lp), ext_pos)


def lsh_attention_chunked(
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    *,
    bucket_size: int,
    n_buckets: int,
    causal: bool = False,
    strict_causal: bool = True,
    key_mask: torch.Tensor | None = None,
    allow_duplicate_attention: bool = True,
    attend_across_buckets: bool = True,
    dropout: float = 0.0,
    training: bool = False,
    return_attn: bool = False,
    self_value: float = SELF_ATTN_VALUE,
    exp_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LSH attention on ``qk``/``v`` ``(b, len, d)`` with ``buckets`` ``(b, n_hashes, len)``.

    ``n_buckets`` is the total number of bucket ids; ``key_mask`` ``(b, len)`` bool, True =
    attendable. ``self_value``: logit of a query's own key. ``exp_lse``: attention and round
    weights are ``exp(x - logsumexp(x))`` as in trax / Hugging Face instead of a softmax - the
    same but for rounding, which shows where a query sees only itself (``x ~ self_value``).
    Returns ``(out (b, len, dv), attn (b, len, len) or None)``.
    """
    b, length, _ = qk.shape
    h = buckets.shape[1]
    qk, v, bad = quarantine_non_finite(qk, v)
    qk, v, layout = pad_and_sort(qk, v, buckets, key_mask, bucket_size, n_buckets)
    c, lp, perm, inv = layout.c, layout.lp, layout.perm, layout.inv
    total = h * lp
    strict = causal and strict_causal
    slot_pos = perm.reshape(b, total)  # position of each slot
    dropout = dropout if training else 0.0
    ext_pos = with_wrap(slot_pos, c) if not strict or return_attn or dropout > 0 else None  # (b, c + total)
    dup_info = None
    if not allow_duplicate_attention:
        rank_or_chunk = inv if strict else (torch.arange(h, device=qk.device)[:, None] * lp + inv) // c
        per_position = torch.stack([rank_or_chunk, layout.buckets], dim=-1).transpose(1, 2)  # (b, lp, h, 2)
        dup_info = with_wrap(per_position.gather(1, perm.reshape(b, total, 1, 1).expand(-1, -1, h, 2)), c)
    slot_group = None
    if not attend_across_buckets and not strict:  # (strict windows hold their own bucket only)
        slot_round = torch.arange(total, device=qk.device) // lp
        slot_group = with_wrap(layout.slot_bucket + slot_round * (n_buckets + 1), c)
    key_valid = None
    if layout.key_valid is not None:
        key_valid = with_wrap(layout.key_valid[layout.slot_row], c)
    rows, rounds = torch.arange(b, device=qk.device), torch.arange(h, device=qk.device)
    round_offset = rows[:, None, None] * total + rounds[:, None] * lp  # (b, h, 1) first slot of each round
    plan = _WindowPlan(
        c=c,
        s=queries_per_window(c, strict),
        lp=lp,
        slot_row=layout.slot_row,
        ext_row=with_wrap(layout.slot_row, c),
        round_slot=round_offset + inv,
        strict=strict,
        span_row=_strict_span_rows(layout.slot_bucket, lp, c, queries_per_window(c, strict)) if strict else None,
        slot_pos=None if strict else ext_pos,
        slot_group=slot_group,
        causal=causal,
        key_valid=key_valid,
        dup_info=dup_info,
        self_value=self_value,
        exp_lse=exp_lse,
        kernels=cpu_kernels.available(qk, c + queries_per_window(c, strict), qk.shape[-1] + v.shape[-1]),
        dropout=_dropout_plan(dropout, round_offset // lp, lp, ext_pos) if dropout > 0 else None,
    )
    save = torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad)
    qk, v = qk.reshape(b * lp, -1), v.to(qk.dtype).reshape(b * lp, -1)
    out, probs, slot_weight = _LSHWindows.apply(qk, v, plan, return_attn, save)
    out = out[:, :length].masked_fill(bad, torch.nan)

    attn = None
    if return_attn:
        with torch.no_grad():
            s = plan.s
            q_pos = slot_pos.view(-1, s)  # (windows, s)
            k_pos = key_windows(ext_pos, s, plan.width).flatten(0, 1)  # (windows, c + s)
            flat_index = q_pos[:, :, None] * lp + k_pos[:, None, :]  # (windows, s, c + s)
            attn = probs.new_zeros(b, lp * lp)
            attn.scatter_add_(1, flat_index.view(b, -1), (probs * slot_weight.view(-1, s, 1)).view(b, -1))
            attn = attn.view(b, lp, lp)[:, :length, :length]
    return out, attn
