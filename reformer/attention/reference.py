"""Dense O(len^2) reference implementations, written for clarity, used by the tests.

Each function computes *exactly* what the corresponding fast path computes (same
windows, masks, duplicate correction and round combination), but by building the full
``len x len`` picture: for every round, a matrix ``M[i, j]`` counting how often key ``j``
occurs (visibly) in query ``i``'s window. The attention of a round is a softmax over those
occurrences; rounds are combined with weights ``softmax_r(lse_r)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import SELF_ATTN_VALUE, masked_value, normalize_keys
from .options import LSHOptions


def _masked_logits(qk: torch.Tensor, hidden: torch.Tensor, log_dup: torch.Tensor | None = None) -> torch.Tensor:
    """``(len, len)`` shared-QK logits of one sequence with masks and self value applied."""
    d = qk.shape[-1]
    logits = qk @ normalize_keys(qk).T * d**-0.5
    if log_dup is not None:
        logits = logits - log_dup
    logits = logits.masked_fill(hidden, masked_value(qk.dtype))
    return logits.masked_fill(torch.eye(len(qk), dtype=torch.bool, device=qk.device), SELF_ATTN_VALUE)


def _round_occurrences(
    buckets: torch.Tensor,
    bucket_size: int,
    strict: bool,
    attend_across_buckets: bool,
) -> torch.Tensor:
    """``(h, lp, lp)`` occurrence counts M_r[i, j] for one padded sequence.

    ``buckets``: ``(h, lp)`` with pads already in the extra last bucket.
    """
    h, lp = buckets.shape
    c = bucket_size
    n_chunks = h * lp // c
    # rank[r, p]: place of position p in round r's stable sort by bucket.
    order = torch.sort(buckets, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    for r in range(h):
        rank[r, order[r]] = torch.arange(lp, device=buckets.device)
    same_bucket = buckets[:, :, None] == buckets[:, None, :]  # (h, lp, lp)
    if strict:
        gap = rank[:, :, None] - rank[:, None, :]
        return (same_bucket & (gap >= 0) & (gap <= c)).to(torch.float64)
    chunk = (torch.arange(h, device=buckets.device)[:, None] * lp + rank) // c  # (h, lp)
    # slots_in_chunk[r, w, j]: how many of position j's round-r slots lie in chunk w
    slots_in_chunk = torch.zeros(h, n_chunks, lp, dtype=torch.float64, device=buckets.device)
    for r in range(h):
        slots_in_chunk[r, chunk[r], torch.arange(lp)] += 1
    occurrences = []
    for r in range(h):
        window = torch.zeros(lp, n_chunks, dtype=torch.float64, device=buckets.device)
        rows = torch.arange(lp)
        window[rows, chunk[r]] += 1
        window[rows, (chunk[r] - 1) % n_chunks] += 1
        if attend_across_buckets:
            occurrences.append(window @ slots_in_chunk.sum(0))
        else:  # only round-r slots of the same bucket are visible
            occurrences.append((window @ slots_in_chunk[r]) * same_bucket[r])
    return torch.stack(occurrences)


def lsh_attention_reference(
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    options: LSHOptions,
    *,
    n_buckets: int,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense version of :func:`reformer.attention.chunked.lsh_attention_chunked`, same arguments
    (of ``options``: ``bucket_size``, ``causal``, ``strict_causal``, ``allow_duplicate_attention``
    and ``attend_across_buckets``; no dropout, softmax weights)."""
    bucket_size, causal = options.bucket_size, options.causal
    b, length, _ = qk.shape
    h = buckets.shape[1]
    lp = -(-length // bucket_size) * bucket_size
    strict = causal and options.strict_causal
    outs, attns = [], []
    for i in range(b):
        pad = lp - length
        x = torch.cat([qk[i], qk.new_zeros(pad, qk.shape[-1])])
        vals = torch.cat([v[i], v.new_zeros(pad, v.shape[-1])])
        bk = torch.cat([buckets[i], buckets.new_full((h, pad), n_buckets)], dim=1)
        valid = torch.ones(lp, dtype=torch.bool, device=qk.device)
        valid[length:] = False
        if key_mask is not None:
            valid[:length] = key_mask[i]
        occ = _round_occurrences(bk, bucket_size, strict, options.attend_across_buckets)  # (h, lp, lp)
        pos = torch.arange(lp, device=qk.device)
        hidden = ~valid[None, :].expand(lp, lp)
        if causal and not strict:
            hidden = hidden | (pos[None, :] > pos[:, None])
        if attn_mask is not None:
            hidden = hidden | ~F.pad(attn_mask[i], (0, pad, 0, pad), value=True)
        log_dup = None
        if not options.allow_duplicate_attention:
            log_dup = occ.sum(0).clamp_min(1).log().to(qk.dtype)
        logits = _masked_logits(x, hidden, log_dup)
        # Multiplicity enters as +log M; keys absent from a round's windows are hidden there.
        log_occ = occ.clamp_min(1).log().to(qk.dtype)
        round_logits = (logits + log_occ).masked_fill(occ == 0, masked_value(qk.dtype))  # (h, lp, lp)
        round_lse = torch.logsumexp(round_logits, dim=-1)  # (h, lp)
        probs = torch.softmax(round_logits, dim=-1)
        weights = torch.softmax(round_lse, dim=0)  # (h, lp)
        attn = (weights[..., None] * probs).sum(0)  # (lp, lp)
        outs.append((attn @ vals)[:length])
        attns.append(attn[:length, :length])
    return torch.stack(outs), torch.stack(attns)


def _dense_attention(
    qk: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, causal: bool, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Shared-QK attention where query i may see key j when ``allowed[i, j]`` (plus masks)."""
    pos = torch.arange(qk.shape[1], device=qk.device)
    outs = []
    for i in range(qk.shape[0]):
        hidden = ~allowed
        if key_mask is not None:
            hidden = hidden | ~key_mask[i][None, :]
        if causal:
            hidden = hidden | (pos[None, :] > pos[:, None])
        outs.append(torch.softmax(_masked_logits(qk[i], hidden), dim=-1) @ v[i])
    return torch.stack(outs)


def full_qk_attention_reference(
    qk: torch.Tensor, v: torch.Tensor, *, causal: bool = False, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense shared-QK attention with the LSH masks (causal, padding, self)."""
    everything = torch.ones(qk.shape[1], qk.shape[1], dtype=torch.bool, device=qk.device)
    return _dense_attention(qk, v, everything, causal, key_mask)


def local_attention_reference(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    window_size: int,
    causal: bool = False,
    look_forward: int = 0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense shared-QK local attention: position i sees j when j's block is i's block,
    the previous one, or (``look_forward``) the next one; blocks are ``window_size`` long."""
    block = torch.arange(qk.shape[1], device=qk.device) // window_size
    offset = block[None, :] - block[:, None]
    return _dense_attention(qk, v, (offset >= -1) & (offset <= look_forward), causal, key_mask)
