"""LSH attention on ``torch.nn.attention.flex_attention`` (torch >= 2.5).

Queries, keys and values are gathered into slot order (one "head" of ``n_hashes * lp``
slots per batch row); a :class:`BlockMask` with blocks of one chunk lists, for each query
block, exactly its own and the previous key block (and, transposed for the backward pass,
each key block's own and next query block). It is built directly from those narrow
``(blocks, 2)`` index tables: nothing of size ``blocks x blocks`` exists, which at 1M tokens
would not fit. ``mask_mod`` applies the window, causal, bucket and padding rules of
``window_plan.WindowPlan.mask_`` inside the blocks; ``score_mod`` gives a query's own key the
self value. The per-slot log-sum-exp comes back with gradient for the round combination.

On CUDA ``flex_attention`` is compiled here, at the call site; on CPU it runs eagerly
(unfused, forward only), which the tests use to check the masks.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from .common import self_logit
from .slots import SlotInputs, SlotLayout, WindowRules


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _neighbour_blocks(n: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, 1, n)`` counts and ``(1, 1, n, 2)`` indices of each block and its neighbour
    ``step`` away (wrapping); one block when the neighbour is the block itself."""
    block = torch.arange(n, device=device, dtype=torch.int32)
    indices = torch.stack([block, (block + step) % n], dim=-1)  # (n, 2)
    counts = torch.full((n,), min(n, 2), device=device, dtype=torch.int32)
    return counts.view(1, 1, n), indices.view(1, 1, n, 2)


def window_block_mask(layout: SlotLayout, rules: WindowRules) -> BlockMask:
    """The block mask of every (chunk, previous chunk) window of ``layout``, broadcast over batch."""
    c, lp, n, total = layout.c, layout.lp, layout.n, layout.total
    slot_row, slot_bucket, key_valid = layout.slot_row, layout.slot_bucket, layout.key_valid

    def mask_mod(b, h, q_idx, kv_idx):
        q_chunk, k_chunk = q_idx // c, kv_idx // c
        q_lane, k_lane = q_idx % c, kv_idx % c
        own = k_chunk == q_chunk
        prev = k_chunk == (q_chunk + n - 1) % n
        q_row, k_row = slot_row[b, q_idx], slot_row[b, kv_idx]
        same_bucket = slot_bucket[b, q_idx] == slot_bucket[b, kv_idx]
        if rules.strict:
            # own chunk: keys j <= i; previous: j >= i, and none at a round's first chunk
            first = (q_chunk * c) % lp == 0
            reach = (own & (k_lane <= q_lane)) | (prev & (k_lane >= q_lane) & ~first)
            visible = reach & same_bucket
            is_self = q_idx == kv_idx
        else:
            visible = own | prev
            is_self = visible & (q_row == k_row)
            if rules.causal:
                visible = visible & (k_row <= q_row)
            if not rules.attend_across_buckets:
                visible = visible & same_bucket & (q_idx // lp == kv_idx // lp)
        if key_valid is not None:
            visible = visible & key_valid[k_row]
        return visible | is_self

    kv_counts, kv_indices = _neighbour_blocks(n, -1, slot_row.device)  # own, previous
    q_counts, q_indices = _neighbour_blocks(n, 1, slot_row.device)  # own, next (sees it as previous)
    return BlockMask(
        (total, total),
        kv_counts,
        kv_indices,
        None,
        None,
        q_counts,
        q_indices,
        None,
        None,
        BLOCK_SIZE=(c, c),
        mask_mod=mask_mod,
    )


def flex_window_attention(
    inputs: SlotInputs, layout: SlotLayout, rules: WindowRules
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot ``out`` ``(b, h * lp, dv)`` and ``lse`` ``(b, h * lp)`` of every window."""
    b, total = layout.slot_row.shape
    # (b, 1, total, .): slots in sorted order, one head
    q, k, v = (x.index_select(0, layout.slot_row.flatten()).view(b, 1, total, -1) for x in inputs)
    slot_row, strict = layout.slot_row, rules.strict
    self_value = self_logit(q.dtype, rules.self_value)

    def score_mod(score, b, h, q_idx, kv_idx):
        is_self = (q_idx == kv_idx) if strict else (slot_row[b, q_idx] == slot_row[b, kv_idx])
        return torch.where(is_self, self_value, score)

    attend = _compiled_flex() if q.is_cuda else flex_attention
    out, aux = attend(
        q, k, v, score_mod=score_mod, block_mask=window_block_mask(layout, rules), scale=1.0,
        return_aux=AuxRequest(lse=True),
    )  # fmt: skip
    return out.view(b, total, -1), aux.lse.view(b, total)
