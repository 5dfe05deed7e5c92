"""Portable LSH attention: sort by bucket, split into chunks, attend within (chunk, previous).

This is the fast path on CPU (and the fallback everywhere). It computes exactly the
function of :func:`reformer.attention.reference.lsh_attention_reference`; see that module
and DESIGN.md section 3 for the contract. Memory is O(n_hashes * len * 2 * bucket_size):
nothing of size len x len exists unless ``return_attn=True``.

Layout: the sequence is padded to a multiple of ``bucket_size`` with pad positions in an
extra bucket that sorts last, so every round occupies whole chunks and pads are never
attended. Each round's positions are stably sorted by ``(bucket, position)``; the rounds
are concatenated (``n_hashes * padded_len`` slots) and split into chunks. A query chunk
sees its own chunk and the previous one, the first chunk wrapping to the last (trax / HF).

Modes:
* non-causal, and ``causal`` with ``strict_causal=False`` (classic, trax / HF): every key
  in the two-chunk window, minus future keys when causal.
* ``causal`` with ``strict_causal=True``: a query sees the at most ``bucket_size`` keys of
  its own bucket that precede it in sorted order in the same round (plus itself). That set
  depends on earlier positions only, so no future token can change an earlier output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import normalize_keys, window_softmax


def padded_length(length: int, bucket_size: int) -> int:
    return -(-length // bucket_size) * bucket_size


def window_slots(n_chunks: int, chunk: int, device: torch.device) -> torch.Tensor:
    """``(n_chunks, 2 * chunk)`` slot indices of each chunk's keys: its own slots, then those of
    the previous chunk (chunk 0 wraps to the last one)."""
    own = torch.arange(n_chunks * chunk, device=device).view(n_chunks, chunk)
    return torch.cat([own, own.roll(1, dims=0)], dim=1)


def _duplicate_counts(
    inv: torch.Tensor,
    buckets: torch.Tensor,
    perm_flat: torch.Tensor,
    *,
    bucket_size: int,
    strict: bool,
    attend_across_buckets: bool,
) -> torch.Tensor:
    """How often each window entry's key occurs, visibly, in all of its query's windows.

    ``inv``/``buckets``: ``(b, h, lp)`` sorted rank and bucket of each position per round.
    Returns ``(b, n, c, 2c)`` counts (>= 1 where the entry is visible).
    """
    b, h, lp = inv.shape
    c = bucket_size
    n = h * lp // c
    rounds = torch.arange(h, device=inv.device)[:, None]
    if strict:
        info = torch.stack([inv, buckets], dim=-1)  # (b, h, lp, 2)
    else:
        info = torch.stack([(rounds * lp + inv) // c, buckets], dim=-1)  # chunk id, bucket
    info = info.permute(0, 2, 1, 3).reshape(b, lp, h * 2)
    at_slots = info.gather(1, perm_flat[..., None].expand(-1, -1, h * 2)).view(b, h * lp, h, 2)
    q = at_slots.view(b, n, c, 1, h, 2)
    k = at_slots[:, window_slots(n, c, inv.device)][:, :, None]  # (b, n, 1, 2c, h, 2)
    same_bucket = q[..., 1] == k[..., 1]  # (b, n, c, 2c, h)
    if strict:
        gap = q[..., 0] - k[..., 0]
        seen = same_bucket & (gap >= 0) & (gap <= c)
        return seen.sum(-1)
    q_chunk, k_chunk = q[..., 0], k[..., 0]
    q_prev = (q_chunk - 1) % n
    seen = (k_chunk == q_chunk).int() + (k_chunk == q_prev).int()
    if not attend_across_buckets:
        return (seen * same_bucket).sum(-1)
    count = seen.sum(-1)
    if h > 1:  # the previous chunk of a round's first chunk lies in the previous round
        count = count + (k_chunk.roll(1, dims=-1) == q_prev).sum(-1)
    return count


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LSH attention on ``qk``/``v`` ``(b, len, d)`` with ``buckets`` ``(b, n_hashes, len)``.

    ``n_buckets`` is the total number of bucket ids; ``key_mask`` ``(b, len)`` bool, True =
    attendable. Returns ``(out (b, len, dv), attn (b, len, len) or None)``.
    """
    b, length, d = qk.shape
    h = buckets.shape[1]
    c = bucket_size
    lp = padded_length(length, c)
    pad = lp - length
    if pad:
        qk = F.pad(qk, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
        buckets = F.pad(buckets, (0, pad), value=n_buckets)  # pads sort after every bucket
        if key_mask is None:
            key_mask = torch.ones(b, length, dtype=torch.bool, device=qk.device)
        key_mask = F.pad(key_mask, (0, pad), value=False)
    total = h * lp
    n = total // c
    dv = v.shape[-1]

    # Sort each round by (bucket, position); keys are unique, so the order is deterministic.
    positions = torch.arange(lp, device=qk.device)
    sort_keys, perm = (buckets * lp + positions).sort(dim=-1)  # (b, h, lp)
    perm_flat = perm.reshape(b, total)  # position at each slot
    inv = torch.empty_like(perm).scatter_(-1, perm, positions.expand(b, h, lp))  # slot of each position

    win = window_slots(n, c, qk.device)  # (n, 2c): own chunk's slots, then the previous chunk's
    q_pos = perm_flat.view(b, n, c)  # position of each query slot
    k_pos = perm_flat[:, win]  # (b, n, 2c) position of each key slot in the window

    def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (b, lp, e) -> (b, *index, e)
        flat = index.reshape(b, -1, 1).expand(-1, -1, x.shape[-1])
        return x.gather(1, flat).view(*index.shape, x.shape[-1])

    bq = gather_rows(qk * d**-0.5, q_pos)  # (b, n, c, d), scaled here: cheaper than scaling dots
    bk = gather_rows(normalize_keys(qk), k_pos)  # (b, n, 2c, d)
    bv = gather_rows(v, k_pos)  # (b, n, 2c, dv)
    dots = torch.matmul(bq, bk.transpose(-1, -2))  # (b, n, c, 2c)

    is_self = q_pos[..., :, None] == k_pos[..., None, :]
    hidden = None
    if key_mask is not None:
        hidden = ~key_mask.gather(1, k_pos.view(b, -1)).view(b, n, 1, 2 * c)

    def hide(extra: torch.Tensor) -> None:
        nonlocal hidden
        hidden = extra if hidden is None else hidden | extra

    strict = causal and strict_causal
    if strict or not attend_across_buckets:
        slot_bucket = (sort_keys // lp).reshape(b, total)
        same_bucket = slot_bucket.view(b, n, c, 1) == slot_bucket[:, win][:, :, None, :]
    q_slots = win[:, :c]  # (n, c)
    if strict:
        # Slot distance with the wrapped look-back of chunk 0 counted as far behind, so that
        # "same round, at most bucket_size earlier in sorted order" is a comparison.
        k_slots = win.clone()
        k_slots[0, c:] -= total
        gap = q_slots[:, :, None] - k_slots[:, None, :]  # (n, c, 2c)
        same_round = q_slots[:, :, None] // lp == k_slots.div(lp, rounding_mode="floor")[:, None, :]
        in_reach = (gap >= 0) & (gap <= c) & same_round
        hide(~(same_bucket & in_reach))
    else:
        if causal:
            hide(k_pos[..., None, :] > q_pos[..., :, None])
        if not attend_across_buckets:
            same_round = q_slots[:, :, None] // lp == (win // lp)[:, None, :]
            hide(~(same_bucket & same_round))

    if not allow_duplicate_attention:
        counts = _duplicate_counts(
            inv,
            buckets,
            perm_flat,
            bucket_size=c,
            strict=strict,
            attend_across_buckets=attend_across_buckets,
        )
        dots = dots - counts.clamp_min(1).to(dots.dtype).log()

    probs, lse = window_softmax(dots, hidden, is_self, dropout, training)
    bo = torch.matmul(probs, bv)  # (b, n, c, dv)

    # Unsort every round back to positions, then combine rounds by their log-sum-exp.
    so = bo.view(b, h, lp, dv)
    slse = lse.view(b, h, lp)
    o = so.gather(2, inv[..., None].expand(-1, -1, -1, dv))  # (b, h, lp, dv)
    round_lse = slse.gather(2, inv)  # (b, h, lp)
    if h == 1:
        out = o[:, 0]
        weights = torch.ones_like(round_lse)
    else:
        acc = torch.promote_types(round_lse.dtype, torch.float32)  # fp32 or better for the weights
        weights = torch.softmax(round_lse.to(acc), dim=1).to(o.dtype)  # (b, h, lp)
        out = (o * weights[..., None]).sum(dim=1)
    out = out[:, :length]

    attn = None
    if return_attn:
        slot_weights = weights.gather(2, perm).view(b, n, c, 1)
        flat_index = q_pos[..., :, None] * lp + k_pos[..., None, :]
        attn = probs.new_zeros(b, lp * lp)
        attn.scatter_add_(1, flat_index.reshape(b, -1), (probs * slot_weights).reshape(b, -1))
        attn = attn.view(b, lp, lp)[:, :length, :length]
    return out, attn
