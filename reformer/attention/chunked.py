"""Portable LSH attention: sort by bucket, split into chunks, attend within (chunk, previous).

This is the fast path on CPU (and the fallback everywhere). It computes exactly the
function of :func:`reformer.attention.reference.lsh_attention_reference`; see that module
and DESIGN.md section 3 for the contract.

Memory: the windows are processed in blocks (:data:`WINDOW_BLOCK_ELEMENTS` logits at a
time) by a custom autograd function that keeps only its inputs, outputs and per-query
log-sum-exp, and recomputes a block's logits in the backward pass (as flash attention
does). So beyond O(n_hashes * len * d) index and output tensors, nothing grows with the
length: no ``len x len`` and not even an ``n_hashes * len * 2 * bucket_size`` buffer exists,
unless ``return_attn=True``.

Layout: the sorted slots of :mod:`reformer.attention.slots` (shared with the GPU backends);
a query chunk sees its own chunk and the previous one, the first chunk wrapping to the last
(trax / HF).

Modes:
* non-causal, and ``causal`` with ``strict_causal=False`` (classic, trax / HF): every key
  in the two-chunk window, minus future keys when causal.
* ``causal`` with ``strict_causal=True``: a query sees the at most ``bucket_size`` keys of
  its own bucket that precede it in sorted order in the same round (plus itself). That set
  depends on earlier positions only, so no future token can change an earlier output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .common import SELF_ATTN_VALUE, fill_masked_
from .slots import combine_rounds, sort_into_slots

#: Logits computed at once per block of windows (``windows * c * 2c``): small enough to stay
#: in cache, large enough that per-block overhead does not matter.
WINDOW_BLOCK_ELEMENTS = 2**20


def window_slots(n_chunks: int, chunk: int, device: torch.device) -> torch.Tensor:
    """``(n_chunks, 2 * chunk)`` slot indices of each chunk's keys: its own slots, then those of
    the previous chunk (chunk 0 wraps to the last one)."""
    own = torch.arange(n_chunks * chunk, device=device).view(n_chunks, chunk)
    return torch.cat([own, own.roll(1, dims=0)], dim=1)


class _BlockIndex(NamedTuple):
    batch: torch.Tensor  # (blk, 1) batch row of each window
    q_slots: torch.Tensor  # (blk, c) query slots within the batch row
    k_slots: torch.Tensor  # (blk, 2c) key slots
    q_rows: torch.Tensor  # (blk, c) rows of the flattened (b * lp) inputs
    k_rows: torch.Tensor  # (blk, 2c)


@dataclass
class _WindowPlan:
    """Everything that decides which key a window entry is and whether it is visible.

    Windows are ordered ``(batch, chunk)``; window ``w`` holds the ``c`` query slots of chunk
    ``w % n`` of batch row ``w // n`` and the ``2c`` key slots of that chunk and its predecessor.
    All tensors are per slot or per position, so a block's masks cost O(block) to build.
    """

    n: int  # chunks per batch row
    c: int  # chunk (bucket) size
    lp: int  # padded length (slots per round)
    total: int  # slots per batch row (n_hashes * lp)
    win: torch.Tensor  # (n, 2c) key slots of each chunk
    slot_row: torch.Tensor  # (b, total) row of each slot in the flattened (b * lp) inputs
    slot_bucket: torch.Tensor  # (b, total) bucket of each slot
    key_valid: torch.Tensor | None  # (b * lp,) bool
    causal: bool
    strict: bool
    attend_across_buckets: bool
    dup_info: torch.Tensor | None  # (b, total, h, 2) per-round rank/chunk and bucket, for -log N
    self_value: float = SELF_ATTN_VALUE  # logit of a query's own key
    exp_lse: bool = False  # weights as exp(x - logsumexp(x)) (trax / HF) instead of softmax

    @property
    def n_windows(self) -> int:
        return self.slot_row.shape[0] * self.n

    def blocks(self) -> list[tuple[int, int]]:
        size = max(1, WINDOW_BLOCK_ELEMENTS // (2 * self.c * self.c))
        return [(s, min(s + size, self.n_windows)) for s in range(0, self.n_windows, size)]

    def index(self, start: int, end: int) -> _BlockIndex:
        """Slots and input rows of the windows ``start:end``."""
        w = torch.arange(start, end, device=self.win.device)
        chunk = w % self.n
        batch = (w // self.n)[:, None]
        q_slots = chunk[:, None] * self.c + torch.arange(self.c, device=w.device)
        k_slots = self.win.index_select(0, chunk)
        return _BlockIndex(
            batch, q_slots, k_slots, _per_row(self.slot_row, batch, q_slots), _per_row(self.slot_row, batch, k_slots)
        )

    def mask(self, idx: _BlockIndex) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``hidden`` and ``is_self`` masks and the ``-log N`` bias, each ``(blk, c, 2c)``."""
        b, q_slots, k_slots, q_rows, k_rows = idx
        hidden = (
            None
            if self.key_valid is None
            else ~self.key_valid.index_select(0, k_rows.flatten()).view(k_rows.shape)[:, None, :]
        )

        def hide(extra: torch.Tensor) -> None:
            nonlocal hidden
            hidden = extra if hidden is None else hidden | extra

        c, device = self.c, q_slots.device
        if self.strict:
            # Within a round, "at most c earlier in sorted order" is a fixed pattern of the
            # window: own-chunk keys j <= i, previous-chunk keys j >= i. A round's first chunk
            # has no previous chunk in its round.
            ones = torch.ones(c, c, dtype=torch.bool, device=device)
            reach = torch.cat([ones.tril(), ones.triu()], dim=1)  # (c, 2c)
            q_bucket, k_bucket = _per_row(self.slot_bucket, b, q_slots), _per_row(self.slot_bucket, b, k_slots)
            visible = (q_bucket[:, :, None] == k_bucket[:, None, :]) & reach
            round_start = (q_slots[:, 0] % self.lp) == 0
            visible[:, :, c:] &= ~round_start[:, None, None]
            hide(~visible)
            is_self = torch.cat([torch.eye(c, dtype=torch.bool, device=device), ~ones], dim=1)[None]
        else:
            is_self = q_rows[:, :, None] == k_rows[:, None, :]
            if self.causal:
                hide(k_rows[:, None, :] > q_rows[:, :, None])  # same batch row: rows order like positions
            if not self.attend_across_buckets:
                q_bucket, k_bucket = _per_row(self.slot_bucket, b, q_slots), _per_row(self.slot_bucket, b, k_slots)
                same_bucket = q_bucket[:, :, None] == k_bucket[:, None, :]
                same_round = (q_slots // self.lp)[:, :, None] == (k_slots // self.lp)[:, None, :]
                hide(~(same_bucket & same_round))
        bias = None
        if self.dup_info is not None:
            counts = self._duplicate_counts(_per_row(self.dup_info, b, q_slots), _per_row(self.dup_info, b, k_slots))
            bias = -counts.clamp_min(1).double().log()  # (exact in fp64; an int tensor would log in fp32)
        return hidden, is_self, bias

    def _duplicate_counts(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """How often each entry's key occurs, visibly, in all of its query's windows.

        ``q`` ``(blk, c, h, 2)``, ``k`` ``(blk, 2c, h, 2)``: per round, the rank (strict) or
        global chunk id (classic) of the position, and its bucket.
        """
        q, k = q[:, :, None], k[:, None]  # (blk, c, 1, h, 2), (blk, 1, 2c, h, 2)
        same_bucket = q[..., 1] == k[..., 1]  # (blk, c, 2c, h)
        if self.strict:
            gap = q[..., 0] - k[..., 0]
            return (same_bucket & (gap >= 0) & (gap <= self.c)).sum(-1)
        q_chunk, k_chunk = q[..., 0], k[..., 0]
        q_prev = (q_chunk - 1) % self.n
        seen = (k_chunk == q_chunk).int() + (k_chunk == q_prev).int()
        if not self.attend_across_buckets:
            return (seen * same_bucket).sum(-1)
        count = seen.sum(-1)
        if k_chunk.shape[-1] > 1:  # a round's first chunk looks back into the previous round
            count = count + (k_chunk.roll(1, dims=-1) == q_prev).sum(-1)
        return count


def _per_row(table: torch.Tensor, batch: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``table[batch, slots]`` for ``table`` ``(b, total, ...)``, ``batch`` ``(blk, 1)``, ``slots``
    ``(blk, k)`` -> ``(blk, k, ...)``, as one ``index_select`` of whole rows of the flattened
    table (much faster on CPU than advanced indexing with two index tensors)."""
    flat = table.reshape(table.shape[0] * table.shape[1], *table.shape[2:])
    return flat.index_select(0, (batch * table.shape[1] + slots).flatten()).view(*slots.shape, *table.shape[2:])


def _take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(r, e)`` at ``rows`` ``(blk, k)`` -> ``(blk, k, e)``."""
    return x.index_select(0, rows.flatten()).view(*rows.shape, x.shape[-1])


def _add_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``x[rows] += values`` for ``rows`` ``(blk, k)`` and ``values`` ``(blk, k, e)``, repeated rows
    summed."""
    x.index_add_(0, rows.flatten(), values.flatten(0, 1))


def _block_probs(
    plan: _WindowPlan, start: int, end: int, q: torch.Tensor, k: torch.Tensor
) -> tuple[_BlockIndex, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index, gathered queries and keys, probabilities, lse and fixed-logit mask of a block."""
    idx = plan.index(start, end)
    bq, bk = _take(q, idx.q_rows), _take(k, idx.k_rows)  # (blk, c, d), (blk, 2c, d)
    dots = torch.bmm(bq, bk.transpose(1, 2))  # (blk, c, 2c)
    hidden, is_self, bias = plan.mask(idx)
    if bias is not None:
        dots += bias.to(dots.dtype)
    fixed = is_self if hidden is None else hidden | is_self  # logits replaced by constants
    fill_masked_(dots, hidden, is_self, plan.self_value)
    if plan.exp_lse:  # trax / HF: exp(x - lse), not renormalised where lse is rounded
        lse = torch.logsumexp(dots, dim=-1)
        return idx, bq, bk, torch.exp(dots - lse[..., None]), lse, fixed
    # Normalise by the sum (exact for self-only queries, where an fp32 lse near -5e4 is only
    # good to ~4e-3); lse = max(x) - log(max(p)) needs no second exponential.
    probs = torch.softmax(dots, dim=-1)
    lse = dots.amax(dim=-1) - probs.amax(dim=-1).log()
    return idx, bq, bk, probs, lse, fixed


class _WindowAttention(torch.autograd.Function):
    """Attention of every window, block by block; the backward recomputes each block.

    Inputs are flattened ``(b * lp, d)`` scaled queries, unit keys and values ``(b * lp, dv)``.
    Outputs: ``out`` ``(windows, c, dv)``, ``lse`` ``(windows, c)`` and, when asked for,
    the probabilities ``(windows, c, 2c)`` (no gradient; for ``return_attn``).
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: _WindowPlan, dropout: float, keep_probs: bool):
        c, dv = plan.c, v.shape[-1]
        out = v.new_empty(plan.n_windows, c, dv)
        lse = q.new_empty(plan.n_windows, c)
        kept, drop_masks = [], []
        for start, end in plan.blocks():
            idx, _, _, probs, lse[start:end], _ = _block_probs(plan, start, end, q, k)
            if keep_probs:
                kept.append(probs)
            if dropout > 0:
                keep = torch.empty_like(probs).bernoulli_(1 - dropout).bool()
                drop_masks.append(keep)
                probs = probs * keep / (1 - dropout)
            torch.bmm(probs, _take(v, idx.k_rows), out=out[start:end])
        ctx.save_for_backward(q, k, v, out)
        ctx.plan, ctx.dropout, ctx.drop_masks = plan, dropout, drop_masks
        all_probs = torch.cat(kept) if keep_probs else q.new_empty(0)
        ctx.mark_non_differentiable(all_probs)
        return out, lse, all_probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse, _grad_probs):
        q, k, v, out = ctx.saved_tensors
        plan, dropout = ctx.plan, ctx.dropout
        grad_out = grad_out.to(v.dtype)
        grad_lse = None if grad_lse is None else grad_lse.to(q.dtype)
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i, (start, end) in enumerate(plan.blocks()):
            idx, bq, bk, probs, _, fixed = _block_probs(plan, start, end, q, k)
            q_rows, k_rows = idx.q_rows, idx.k_rows
            bv = _take(v, k_rows)
            go = grad_out[start:end]  # (blk, c, dv)
            used = probs
            if dropout > 0:
                keep = ctx.drop_masks[i].to(probs.dtype) / (1 - dropout)
                used = probs * keep
            _add_rows(grad_v, k_rows, torch.bmm(used.transpose(1, 2), go))
            grad_probs = torch.bmm(go, bv.transpose(1, 2))  # (blk, c, 2c)
            if dropout > 0:
                grad_probs *= keep
            # softmax backward: p * (g - sum(g * p)); sum(g * p) == sum(grad_out * out) per query.
            shift = (go * out[start:end]).sum(-1, keepdim=True)
            if grad_lse is not None:
                shift = shift - grad_lse[start:end, :, None]
            grad_dots = probs * (grad_probs - shift)
            grad_dots.masked_fill_(fixed, 0)
            _add_rows(grad_q, q_rows, torch.bmm(grad_dots, bk))
            _add_rows(grad_k, k_rows, torch.bmm(grad_dots.transpose(1, 2), bq))
        return grad_q, grad_k, grad_v, None, None, None


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
    inputs, layout = sort_into_slots(qk, v, buckets, key_mask, bucket_size, n_buckets)
    c, lp, n, perm, inv = layout.c, layout.lp, layout.n, layout.perm, layout.inv
    total = h * lp
    strict = causal and strict_causal
    dup_info = None
    if not allow_duplicate_attention:
        rank_or_chunk = inv if strict else (torch.arange(h, device=qk.device)[:, None] * lp + inv) // c
        per_position = torch.stack([rank_or_chunk, layout.buckets], dim=-1).transpose(1, 2)  # (b, lp, h, 2)
        dup_info = per_position.gather(1, perm.reshape(b, total, 1, 1).expand(-1, -1, h, 2))
    plan = _WindowPlan(
        n=n,
        c=c,
        lp=lp,
        total=total,
        win=window_slots(n, c, qk.device),
        slot_row=layout.slot_row,
        slot_bucket=layout.slot_bucket,
        key_valid=layout.key_valid,
        causal=causal,
        strict=strict,
        attend_across_buckets=attend_across_buckets,
        dup_info=dup_info,
        self_value=self_value,
        exp_lse=exp_lse,
    )
    dropout = dropout if training else 0.0
    window_out, window_lse, probs = _WindowAttention.apply(inputs.q, inputs.k, inputs.v, plan, dropout, return_attn)
    out, weights = combine_rounds(window_out.view(b, total, -1), window_lse.view(b, total), layout, length, exp_lse)

    attn = None
    if return_attn:
        with torch.no_grad():
            slot_weights = weights.gather(2, perm).view(b * n, c, 1)
            _, _, _, q_rows, k_rows = plan.index(0, plan.n_windows)
            flat_index = (q_rows[:, :, None] % lp) * lp + (k_rows[:, None, :] % lp)  # (b*n, c, 2c)
            attn = probs.new_zeros(b, lp * lp)
            attn.scatter_add_(1, flat_index.view(b, -1), (probs * slot_weights).view(b, -1))
            attn = attn.view(b, lp, lp)[:, :length, :length]
    return out, attn
