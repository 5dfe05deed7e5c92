"""Fused LSH attention in Triton: one program per chunk, online softmax over its window.

Computes, per sorted slot, what the chunked backend computes
(:func:`reformer.attention.chunked.lsh_attention_chunked`; docs/design.md, "The attention
contract"): a query chunk attends to its own chunk and the previous one (the first wrapping
to the last), reading queries, keys and values straight from the unsorted inputs through
the sort indices, so no sorted copy of ``q``/``k``/``v`` is ever written.
Logits accumulate in fp32 whatever the input dtype (fp16, bf16, fp32; head dims 16 to 128).

Forward: one program per (chunk, batch row) writes ``out`` and ``lse`` of its ``c`` slots.
Backward, flash-attention style, recomputes the logits and, from the saved row max and sum,
the probabilities: one program per query chunk accumulates ``dq`` over its two key chunks,
one program per key chunk accumulates ``dk``/``dv`` over the two query chunks that see it
(its own, and the next as "previous").
Gradients are written per slot in fp32 and summed over rounds by a gather, so the result
is deterministic (no atomics).

The launches are two PyTorch operators, so that ``torch.compile`` and ``torch.export`` see them:
``reformer::lsh_triton_windows`` (per-slot ``out``, ``lse`` and the row max and sum the backward
needs) and ``reformer::lsh_triton_windows_backward``, registered as its gradient. They take
tensors and plain values only (the layout's index tensors and chunk size, the rules' flags).
With compiled kernels they are ``torch.library.triton_op``s launching through ``wrap_triton``;
under the interpreter, opaque custom operators (see ``_define_operator``).

Supported subset (the rest runs on the chunked path; see :mod:`reformer.attention.backends`):
no dropout, no ``return_attn``, ``allow_duplicate_attention=True``, ``exp_lse=False``.
Runs on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from .common import self_logit
from .slots import SlotInputs, SlotLayout, WindowRules

#: Logit of a hidden key: finite, so padding lanes never produce NaN, and far below any
#: self value, so ``exp`` of it is exactly 0 for every real query.
_HIDDEN = -1.0e30

HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _chunk_slots(slot_row_ptr, slot_bucket_ptr, base, chunk, c, BLOCK: tl.constexpr):
    """Slots, input rows and buckets of the ``BLOCK`` lanes of one chunk (lanes >= c are dead)."""
    lane = tl.arange(0, BLOCK)
    live = lane < c
    slot = chunk * c + lane
    row = tl.load(slot_row_ptr + base + slot, mask=live, other=0).to(tl.int64)
    bucket = tl.load(slot_bucket_ptr + base + slot, mask=live, other=-1)
    return lane, slot, row, bucket, live


@triton.jit
def _load_rows(ptr, row, live, WIDTH: tl.constexpr):
    """``(BLOCK, WIDTH)`` rows of a row-major ``(rows, WIDTH)`` tensor; dead lanes read 0."""
    cols = tl.arange(0, WIDTH)
    return tl.load(ptr + row[:, None] * WIDTH + cols[None, :], mask=live[:, None], other=0.0)


@triton.jit
def _scores(
    q,
    k,
    q_lane,
    q_slot,
    q_row,
    q_bucket,
    k_lane,
    k_slot,
    k_row,
    k_bucket,
    k_live,
    key_valid_ptr,
    q_chunk,
    c,
    lp,
    self_value,
    IS_PREV: tl.constexpr,
    CAUSAL: tl.constexpr,
    STRICT: tl.constexpr,
    ACROSS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Masked fp32 logits ``(BLOCK, BLOCK)`` of a query chunk against one key chunk of its
    window, and ``fixed``: the entries set to a constant (hidden or self), which get no
    gradient. The rules are those of ``window_plan.WindowPlan.mask_``."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    hidden = ~k_live[None, :]
    if HAS_MASK:
        valid = tl.load(key_valid_ptr + k_row, mask=k_live, other=0)
        hidden = hidden | (valid == 0)[None, :]
    if STRICT:
        # own chunk: keys j <= i; previous chunk: j >= i, and none at a round's first chunk
        if IS_PREV:
            reach = k_lane[None, :] >= q_lane[:, None]
            reach = reach & ((q_chunk * c) % lp != 0)
        else:
            reach = k_lane[None, :] <= q_lane[:, None]
        hidden = hidden | ~(reach & (q_bucket[:, None] == k_bucket[None, :]))
        if IS_PREV:
            is_self = q_lane[:, None] < 0  # all False
        else:
            is_self = q_lane[:, None] == k_lane[None, :]
    else:
        is_self = q_row[:, None] == k_row[None, :]
        if CAUSAL:
            hidden = hidden | (k_row[None, :] > q_row[:, None])  # same batch row: rows order like positions
        if not ACROSS:
            same = (q_bucket[:, None] == k_bucket[None, :]) & ((q_slot // lp)[:, None] == (k_slot // lp)[None, :])
            hidden = hidden | ~same
    is_self = is_self & k_live[None, :]
    s = tl.where(hidden, _HIDDEN, s)
    s = tl.where(is_self, self_value, s)
    return s, hidden | is_self


@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slot_row_ptr,
    slot_bucket_ptr,
    key_valid_ptr,
    out_ptr,
    lse_ptr,
    stats_ptr,
    total,
    n,
    c,
    lp,
    self_value,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    STRICT: tl.constexpr,
    ACROSS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * total
    q_lane, q_slot, q_row, q_bucket, q_live = _chunk_slots(slot_row_ptr, slot_bucket_ptr, base, chunk, c, BLOCK)
    q = _load_rows(q_ptr, q_row, q_live, D)
    m = tl.full((BLOCK,), _HIDDEN, tl.float32)
    row_sum = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, DV), tl.float32)
    for part in tl.static_range(2):  # own chunk, then the previous one
        k_chunk = (chunk + n - part) % n
        k_lane, k_slot, k_row, k_bucket, k_live = _chunk_slots(slot_row_ptr, slot_bucket_ptr, base, k_chunk, c, BLOCK)
        k = _load_rows(k_ptr, k_row, k_live, D)
        v = _load_rows(v_ptr, k_row, k_live, DV)
        s, _ = _scores(
            q, k, q_lane, q_slot, q_row, q_bucket, k_lane, k_slot, k_row, k_bucket, k_live, key_valid_ptr,
            chunk, c, lp, self_value, part, CAUSAL, STRICT, ACROSS, HAS_MASK, PRECISION,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / row_sum[:, None]
    slot = base + q_slot
    cols = tl.arange(0, DV)
    tl.store(out_ptr + slot[:, None] * DV + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=q_live[:, None])
    tl.store(lse_ptr + slot, m + tl.log(row_sum), mask=q_live)
    tl.store(stats_ptr + 2 * slot, m, mask=q_live)
    tl.store(stats_ptr + 2 * slot + 1, row_sum, mask=q_live)


@triton.jit
def _load_stats(stats_ptr, delta_ptr, slot, live):
    """Row max, row sum and ``delta`` of the queries at ``slot``."""
    m = tl.load(stats_ptr + 2 * slot, mask=live, other=0.0)
    row_sum = tl.load(stats_ptr + 2 * slot + 1, mask=live, other=1.0)
    delta = tl.load(delta_ptr + slot, mask=live, other=0.0)
    return m, row_sum, delta


@triton.jit
def _query_grads(
    q,
    do,
    m,
    row_sum,
    delta,
    k,
    v,
    s,
    fixed,
    q_live,
    PRECISION: tl.constexpr,
):
    """Probabilities ``(BLOCK, BLOCK)`` and logit gradients of one (query chunk, key chunk) pair:
    ``ds = p * (dp - delta)``, 0 where the logit was fixed or the query lane is dead.

    ``p = exp(s - m) / row_sum``, not ``exp(s - lse)``: for a query that sees only itself, ``lse`` is
    near the self value (-5e4), where fp32 is good to ~4e-3 only."""
    p = tl.exp(s - m[:, None]) / row_sum[:, None]
    p = tl.where(q_live[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = tl.where(fixed, 0.0, p * (dp - delta[:, None]))
    return p, ds


@triton.jit
def _backward_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    stats_ptr,
    delta_ptr,
    slot_row_ptr,
    slot_bucket_ptr,
    key_valid_ptr,
    dq_ptr,
    total,
    n,
    c,
    lp,
    self_value,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    STRICT: tl.constexpr,
    ACROSS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * total
    q_lane, q_slot, q_row, q_bucket, q_live = _chunk_slots(slot_row_ptr, slot_bucket_ptr, base, chunk, c, BLOCK)
    q = _load_rows(q_ptr, q_row, q_live, D)
    slot = base + q_slot
    do = _load_rows(do_ptr, slot, q_live, DV)
    m, row_sum, delta = _load_stats(stats_ptr, delta_ptr, slot, q_live)
    dq = tl.zeros((BLOCK, D), tl.float32)
    for part in tl.static_range(2):
        k_chunk = (chunk + n - part) % n
        k_lane, k_slot, k_row, k_bucket, k_live = _chunk_slots(slot_row_ptr, slot_bucket_ptr, base, k_chunk, c, BLOCK)
        k = _load_rows(k_ptr, k_row, k_live, D)
        v = _load_rows(v_ptr, k_row, k_live, DV)
        s, fixed = _scores(
            q, k, q_lane, q_slot, q_row, q_bucket, k_lane, k_slot, k_row, k_bucket, k_live, key_valid_ptr,
            chunk, c, lp, self_value, part, CAUSAL, STRICT, ACROSS, HAS_MASK, PRECISION,
        )  # fmt: skip
        _, ds = _query_grads(q, do, m, row_sum, delta, k, v, s, fixed, q_live, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    cols = tl.arange(0, D)
    tl.store(dq_ptr + slot[:, None] * D + cols[None, :], dq, mask=q_live[:, None])


@triton.jit
def _backward_dkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    stats_ptr,
    delta_ptr,
    slot_row_ptr,
    slot_bucket_ptr,
    key_valid_ptr,
    dk_ptr,
    dv_ptr,
    total,
    n,
    c,
    lp,
    self_value,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    STRICT: tl.constexpr,
    ACROSS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * total
    k_lane, k_slot, k_row, k_bucket, k_live = _chunk_slots(slot_row_ptr, slot_bucket_ptr, base, chunk, c, BLOCK)
    k = _load_rows(k_ptr, k_row, k_live, D)
    v = _load_rows(v_ptr, k_row, k_live, DV)
    dk = tl.zeros((BLOCK, D), tl.float32)
    dv = tl.zeros((BLOCK, DV), tl.float32)
    for part in tl.static_range(2):  # queries of this chunk, then those of the next (this is their "previous")
        q_chunk = (chunk + part) % n
        q_lane, q_slot, q_row, q_bucket, q_live = _chunk_slots(slot_row_ptr, slot_bucket_ptr, base, q_chunk, c, BLOCK)
        q = _load_rows(q_ptr, q_row, q_live, D)
        slot = base + q_slot
        do = _load_rows(do_ptr, slot, q_live, DV)
        m, row_sum, delta = _load_stats(stats_ptr, delta_ptr, slot, q_live)
        s, fixed = _scores(
            q, k, q_lane, q_slot, q_row, q_bucket, k_lane, k_slot, k_row, k_bucket, k_live, key_valid_ptr,
            q_chunk, c, lp, self_value, part, CAUSAL, STRICT, ACROSS, HAS_MASK, PRECISION,
        )  # fmt: skip
        p, ds = _query_grads(q, do, m, row_sum, delta, k, v, s, fixed, q_live, PRECISION)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    slot = base + k_slot
    tl.store(dk_ptr + slot[:, None] * D + tl.arange(0, D)[None, :], dk, mask=k_live[:, None])
    tl.store(dv_ptr + slot[:, None] * DV + tl.arange(0, DV)[None, :], dv, mask=k_live[:, None])


def _launch_args(
    q: torch.Tensor,
    v: torch.Tensor,
    slot_row: torch.Tensor,
    slot_bucket: torch.Tensor,
    key_valid: torch.Tensor | None,
    inv: torch.Tensor,
    c: int,
    causal: bool,
    strict: bool,
    attend_across_buckets: bool,
    self_value: float,
) -> tuple[tuple, tuple, dict]:
    """Grid, index tensors and sizes, and compile-time flags shared by the three kernels."""
    b, total = slot_row.shape
    n = total // c
    has_mask = key_valid is not None
    slot_row, slot_bucket = slot_row.contiguous(), slot_bucket.contiguous()
    valid = key_valid.contiguous().view(torch.uint8) if has_mask else slot_row  # without a mask: unread
    index = (slot_row, slot_bucket, valid)
    sizes = (total, n, c, inv.shape[-1], self_logit(q.dtype, self_value))
    flags = dict(
        D=q.shape[-1],
        DV=v.shape[-1],
        BLOCK=max(16, triton.next_power_of_2(c)),  # tl.dot needs >= 16 lanes
        CAUSAL=causal,
        STRICT=strict,
        ACROSS=attend_across_buckets,
        HAS_MASK=has_mask,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
    )
    return (n, b), index + sizes, flags


def _sum_rounds(per_slot: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``(b, h * lp, e)`` per-slot gradients -> ``(b * lp, e)`` per position, summed over rounds
    (``inv`` ``(b, h, lp)``: the slot of each position in a round)."""
    b, h, lp = inv.shape
    e = per_slot.shape[-1]
    per_round = per_slot.view(b, h, lp, e).gather(2, inv[..., None].expand(-1, -1, -1, e))  # (b, h, lp, e)
    return per_round.sum(1).view(b * lp, e)


#: With compiled kernels, ``triton_op``: AOTAutograd traces the operators into their kernel launches,
#: which Inductor compiles with the rest of the graph. Under ``TRITON_INTERPRET=1`` (the CPU tests)
#: ``triton.jit`` makes interpreted kernels, which ``wrap_triton`` cannot put in a graph: there the
#: operators are opaque custom operators, which a compiled graph calls as a whole.
_define_operator = (
    torch.library.custom_op if isinstance(_forward_kernel, InterpretedFunction) else torch.library.triton_op
)


@_define_operator("reformer::lsh_triton_windows", mutates_args=())
def _windows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_row: torch.Tensor,
    slot_bucket: torch.Tensor,
    key_valid: torch.Tensor | None,
    inv: torch.Tensor,
    c: int,
    causal: bool,
    strict: bool,
    attend_across_buckets: bool,
    self_value: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-slot ``out`` ``(b, h * lp, dv)``, and fp32 ``lse`` ``(b, h * lp)`` and ``stats``
    ``(b, h * lp, 2)`` (row max, row sum: what the backward recomputes probabilities from).

    ``q``, ``k``, ``v`` ``(b * lp, .)``; the layout's int32 ``slot_row`` and ``slot_bucket``
    ``(b, h * lp)``, bool ``key_valid`` ``(b * lp,)`` or None, ``inv`` ``(b, h, lp)`` (its shape
    gives ``lp``; the gradient sums the rounds with it) and chunk size ``c``; the rules' flags."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, total = slot_row.shape
    grid, args, flags = _launch_args(
        q, v, slot_row, slot_bucket, key_valid, inv, c, causal, strict, attend_across_buckets, self_value
    )
    out = v.new_empty(b, total, v.shape[-1])
    lse = torch.empty(b, total, dtype=torch.float32, device=q.device)
    stats = torch.empty(b, total, 2, dtype=torch.float32, device=q.device)
    wrap_triton(_forward_kernel)[grid](q, k, v, *args[:3], out, lse, stats, *args[3:], **flags)
    return out, lse, stats


@_windows.register_fake  # (the opaque operators need it; a triton_op's traced function gives the same)
def _(q, k, v, slot_row, slot_bucket, key_valid, inv, c, causal, strict, attend_across_buckets, self_value):
    b, total = slot_row.shape
    lse = torch.empty(b, total, dtype=torch.float32, device=q.device)
    return v.new_empty(b, total, v.shape[-1]), lse, lse.new_empty(b, total, 2)


@_define_operator("reformer::lsh_triton_windows_backward", mutates_args=())
def _windows_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_row: torch.Tensor,
    slot_bucket: torch.Tensor,
    key_valid: torch.Tensor | None,
    inv: torch.Tensor,
    c: int,
    causal: bool,
    strict: bool,
    attend_across_buckets: bool,
    self_value: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``q``, ``k``, ``v`` for ``grad_out`` and ``grad_lse`` of ``out`` and
    ``lse`` of :func:`_windows` (with its ``stats``, and its inputs after these)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, total = slot_row.shape
    grid, args, flags = _launch_args(
        q, v, slot_row, slot_bucket, key_valid, inv, c, causal, strict, attend_across_buckets, self_value
    )
    # softmax backward: sum_j p_ij dp_ij == do_i . o_i; an lse gradient shifts it
    delta = (grad_out.float() * out.float()).sum(-1) - grad_lse.float()  # (b, total)
    do = grad_out.to(v.dtype).contiguous()
    dq = torch.empty(b, total, q.shape[-1], dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(dq), torch.empty(b, total, v.shape[-1], dtype=torch.float32, device=q.device)
    wrap_triton(_backward_dq_kernel)[grid](q, k, v, do, stats, delta, *args[:3], dq, *args[3:], **flags)
    wrap_triton(_backward_dkv_kernel)[grid](q, k, v, do, stats, delta, *args[:3], dk, dv, *args[3:], **flags)
    return tuple(_sum_rounds(g, inv).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))


@_windows_backward.register_fake
def _(grad_out, grad_lse, out, stats, q, k, v, slot_row, slot_bucket, key_valid, inv, c, causal, strict,
      attend_across_buckets, self_value):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    tensors, window = inputs[:7], inputs[7:]  # q, k, v and the layout's tensors; c and the rules
    out, _, stats = output
    ctx.save_for_backward(out, stats, *tensors)
    ctx.window = window


def _gradient(ctx, grad_out, grad_lse, _grad_stats):
    grads = torch.ops.reformer.lsh_triton_windows_backward(grad_out, grad_lse, *ctx.saved_tensors, *ctx.window)
    return *grads, *[None] * 9  # none for the layout and the rules


_windows.register_autograd(_gradient, setup_context=_setup_context)


def operator_args(inputs: SlotInputs, layout: SlotLayout, rules: WindowRules) -> tuple:
    """The arguments of ``reformer::lsh_triton_windows`` for ``inputs`` in ``layout`` under ``rules``."""
    index = (
        layout.slot_row.to(torch.int32),  # rows < 2**31: b * len up to 2G positions
        layout.slot_bucket.to(torch.int32),
        layout.key_valid,
        layout.inv,
    )
    return *inputs, *index, layout.c, rules.causal, rules.strict, rules.attend_across_buckets, rules.self_value


def triton_window_attention(
    inputs: SlotInputs, layout: SlotLayout, rules: WindowRules
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot ``out`` ``(b, h * lp, dv)`` and ``lse`` ``(b, h * lp)`` of every window."""
    out, lse, _ = torch.ops.reformer.lsh_triton_windows(*operator_args(inputs, layout, rules))
    return out, lse
