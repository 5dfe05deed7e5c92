"""The sorted-slot layout every LSH attention backend works in (docs/design.md, "The attention contract").

The sequence is padded to a multiple of ``bucket_size`` with pad positions in an extra bucket
that sorts last, so every round occupies whole chunks and pads are never attended. Each
round's positions are stably sorted by ``(bucket, position)``; the rounds are concatenated
(``n_hashes * padded_len`` slots per batch row) and split into chunks of ``bucket_size``.
A backend computes, for every slot, the attention of its query over the window of its chunk
and the previous one (``out`` and ``lse`` per slot); :func:`combine_rounds` then unsorts the
slots back to positions and mixes the rounds by their log-sum-exp.

Sorting is one batched ``sort`` over all ``(batch, head, round)`` rows at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..native import kernels as cpu_kernels
from .common import normalize_keys


def padded_length(length: int, bucket_size: int) -> int:
    return -(-length // bucket_size) * bucket_size


class SlotLayout(NamedTuple):
    """Where every position of every round sits after sorting; ``b`` batch rows, ``h`` rounds."""

    c: int  # chunk (bucket) size
    lp: int  # padded length (slots per round)
    n: int  # chunks per batch row (h * lp // c)
    buckets: torch.Tensor  # (b, h, lp) bucket ids, pads in the extra last bucket
    perm: torch.Tensor  # (b, h, lp) position at each slot of a round
    inv: torch.Tensor  # (b, h, lp) slot of each position in a round
    slot_row: torch.Tensor  # (b, h * lp) row of each slot in the flattened (b * lp) inputs
    slot_bucket: torch.Tensor  # (b, h * lp) bucket of each slot
    key_valid: torch.Tensor | None  # (b * lp,) bool, True = attendable

    @property
    def total(self) -> int:
        """Slots per batch row."""
        return self.slot_row.shape[1]


class CpuKernels(NamedTuple):
    """Which C kernels of :mod:`reformer.native.kernels` serve one LSH attention call: decided once
    per call (:func:`cpu_kernels_for`) and asked by each of its steps, never decided again."""

    sort: bool  # the counting sort of the buckets (on CPU, any dtype)
    windows: bool  # the window row kernels (fp32 on CPU, windows and features within their limits)


def cpu_kernels_for(qk: torch.Tensor, width: int = 0, features: int = 0) -> CpuKernels:
    """The kernels that serve attention on ``qk`` with windows of ``width`` keys and ``features``
    key + value features (see :func:`reformer.native.kernels.available`)."""
    sort = cpu_kernels.serves(qk)
    return CpuKernels(sort=sort, windows=sort and cpu_kernels.available(qk, width, features))


class WindowRules(NamedTuple):
    """Which keys of a window a query sees (the masks of docs/design.md, "Masks")."""

    causal: bool  # classic causal: no key at a later position
    strict: bool  # strict causal: own bucket, at most ``c`` earlier slots of the round
    attend_across_buckets: bool  # False: keys of other buckets or rounds are hidden
    self_value: float  # logit of a query's own key


class SlotInputs(NamedTuple):
    """Flattened ``(b * lp, .)`` scaled queries, unit keys and values, in position order."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def sort_into_slots(
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    key_mask: torch.Tensor | None,
    bucket_size: int,
    n_buckets: int,
) -> tuple[SlotInputs, SlotLayout]:
    """Pad ``qk``/``v`` ``(b, len, .)`` and sort ``buckets`` ``(b, h, len)``; see the module doc."""
    qk, v, layout = pad_and_sort(qk, v, buckets, key_mask, bucket_size, n_buckets, cpu_kernels_for(qk))
    b, lp, d = qk.shape
    inputs = SlotInputs(
        q=(qk * d**-0.5).reshape(b * lp, d),  # scaled here: cheaper than scaling logits
        k=normalize_keys(qk).reshape(b * lp, d),
        v=v.to(qk.dtype).reshape(b * lp, v.shape[-1]),
    )
    return inputs, layout


def pad_and_sort(
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    key_mask: torch.Tensor | None,
    bucket_size: int,
    n_buckets: int,
    kernels: CpuKernels,
) -> tuple[torch.Tensor, torch.Tensor, SlotLayout]:
    """``qk``, ``v`` padded to ``(b, lp, .)`` and the sorted layout of ``buckets`` ``(b, h, len)``;
    ``kernels``: the call's decision whether the counting sort kernel serves."""
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

    # Sort each round by (bucket, position); keys are unique, so the order is deterministic.
    if kernels.sort:  # a counting sort: O(lp) per round, not O(lp log lp)
        perm, inv, slot_bucket = cpu_kernels.bucket_sort(buckets, n_buckets + 1)  # (b, h, lp) each
    else:
        positions = torch.arange(lp, device=qk.device)
        sort_keys, perm = (buckets * lp + positions).sort(dim=-1)  # (b, h, lp)
        inv = torch.empty_like(perm).scatter_(-1, perm, positions.expand(b, h, lp))  # slot of each position
        slot_bucket = sort_keys // lp
    row_offset = torch.arange(b, device=qk.device)[:, None] * lp
    layout = SlotLayout(
        c=c,
        lp=lp,
        n=h * lp // c,
        buckets=buckets,
        perm=perm,
        inv=inv,
        slot_row=perm.reshape(b, h * lp) + row_offset,
        slot_bucket=slot_bucket.reshape(b, h * lp),
        key_valid=None if key_mask is None else key_mask.reshape(-1),
    )
    return qk, v, layout


def round_weights(round_lse: torch.Tensor, exp_lse: bool = False) -> torch.Tensor:
    """Weights of the rounds ``softmax_r(lse_r)`` from their log-sum-exps ``(..., h, lp)`` (rounds
    on dim -2), computed in fp32 or better; ``exp_lse``: ``exp(lse - logsumexp(lse))`` (trax / HF)."""
    if round_lse.shape[-2] == 1:
        return torch.ones_like(round_lse)
    lse = round_lse.to(torch.promote_types(round_lse.dtype, torch.float32))
    if exp_lse:
        return torch.exp(lse - torch.logsumexp(lse, dim=-2, keepdim=True)).to(round_lse.dtype)
    return torch.softmax(lse, dim=-2).to(round_lse.dtype)


def combine_rounds(
    slot_out: torch.Tensor, slot_lse: torch.Tensor, layout: SlotLayout, length: int, exp_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsort every round back to positions, then combine rounds by their log-sum-exp.

    ``slot_out`` ``(b, h * lp, dv)`` and ``slot_lse`` ``(b, h * lp)`` in slot order. Returns
    ``out`` ``(b, length, dv)`` and the round weights ``(b, h, lp)``.
    """
    b, h, lp = layout.inv.shape
    dv = slot_out.shape[-1]
    o = slot_out.view(b, h, lp, dv).gather(2, layout.inv[..., None].expand(-1, -1, -1, dv))  # (b, h, lp, dv)
    weights = round_weights(slot_lse.view(b, h, lp).gather(2, layout.inv), exp_lse).to(o.dtype)  # (b, h, lp)
    if h == 1:
        return o[:, 0, :length], weights
    return (o * weights[..., None]).sum(dim=1)[:, :length], weights
