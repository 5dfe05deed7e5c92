"""Portable LSH attention: sort by bucket, split into chunks, attend within (chunk, previous).

This is the fast path on CPU (and the fallback everywhere). It computes exactly the
function of :func:`reformer.attention.reference.lsh_attention_reference`; see that module
and DESIGN.md section 3 for the contract.

Here: the entry point, :func:`lsh_attention_chunked`, and the autograd function around the
windows. The work is split by job:

* :mod:`.window_plan` - the windows (which keys each holds, ``s`` queries per window), their
  masks and their blocks;
* :mod:`.window_torch` - their attention in torch ops, block by block (any device and dtype);
* :mod:`.window_kernels` - the same with the CPU C kernels of :mod:`reformer.cpu_kernels`
  (fp32 on CPU), with the strict causal windows fused into one kernel call per worker part.

Whether the CPU kernels serve a call is decided once, at its start
(:func:`reformer.attention.slots.cpu_kernels_for`): the sort and the plan take that decision,
and :func:`lsh_attention_chunked` dispatches on it once.

Memory: one custom autograd function does the windows and the combination of rounds. When a
gradient is needed it keeps the attention probabilities (``n_hashes * len * (c + s)`` per
head: linear in the length), so the backward needs neither a second ``q k^T`` nor the masks
and softmax again; the gathered inputs are rebuilt there rather than kept. Nothing of size
``len x len`` exists unless ``return_attn=True``.
"""

from __future__ import annotations

import torch

from .common import SELF_ATTN_VALUE, quarantine_non_finite
from .slots import cpu_kernels_for, pad_and_sort
from .window_kernels import KernelWindows
from .window_plan import build_plan, key_windows, queries_per_window, with_wrap
from .window_torch import TorchWindows


class _LSHWindows(torch.autograd.Function):
    """Attention of every window and the combination of rounds, by ``path`` (the torch-op or the
    CPU-kernel implementation of the plan's windows).

    Inputs are the flattened, padded shared query/keys ``(b * lp, d)`` and values ``(b * lp, dv)``
    in position order; the scaled queries and unit keys are made here, packed with the values
    as ``[q | k | v]`` rows (one gather per block), and their gradients folded back into one for
    ``qk`` by hand (fewer full-size passes than autograd through the scaling and norm).
    Outputs: ``out`` ``(b, lp, dv)`` in position order; when asked for, the probabilities
    ``(windows, s, c + s)`` and the slots' round weights ``(b, total)`` (no gradient; for
    ``return_attn``).
    """

    @staticmethod
    def forward(ctx, qk, v, path: TorchWindows, keep_probs: bool, save: bool):
        plan = path.plan
        qkv, norm = path.pack_qkv(qk, v)  # (b * lp, 2d + dv), (b * lp, 1)
        all_probs = qk.new_empty(plan.n_windows, plan.s, plan.width) if save or keep_probs else None
        out, slot_weight = path.forward(qkv, all_probs)  # (b, lp, dv), (b * total,)
        if save:
            ctx.save_for_backward(qkv, norm, out, all_probs, slot_weight)
            ctx.path = path
        kept = all_probs if keep_probs else qk.new_empty(0)
        ctx.mark_non_differentiable(kept, slot_weight)
        return out, kept, slot_weight.view(plan.rows, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_probs, _grad_weight):
        qkv, norm, out, all_probs, slot_weight = ctx.saved_tensors
        path = ctx.path
        grad = path.backward(qkv, all_probs, grad_out, out, slot_weight)  # (b * lp, 2d + dv)
        return path.qk_grad(qkv, norm, grad), grad[:, 2 * path.d :], None, None, None


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
    b, length, d = qk.shape
    dv = v.shape[-1]
    strict = causal and strict_causal
    c = bucket_size
    kernels = cpu_kernels_for(qk, c + queries_per_window(c, strict), d + dv)  # the one decision of the call
    qk, v, bad = quarantine_non_finite(qk, v)
    qk, v, layout = pad_and_sort(qk, v, buckets, key_mask, bucket_size, n_buckets, kernels)
    lp = layout.lp
    plan = build_plan(
        layout,
        d=d,
        dv=dv,
        n_buckets=n_buckets,
        causal=causal,
        strict=strict,
        allow_duplicate_attention=allow_duplicate_attention,
        attend_across_buckets=attend_across_buckets,
        dropout=dropout if training else 0.0,
        self_value=self_value,
        exp_lse=exp_lse,
        kernels=kernels.windows,
    )
    path = (KernelWindows if plan.kernels else TorchWindows)(plan, d, dv)
    save = torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad)
    qk, v = qk.reshape(b * lp, d), v.to(qk.dtype).reshape(b * lp, dv)
    out, probs, slot_weight = _LSHWindows.apply(qk, v, path, return_attn, save)
    out = out[:, :length].masked_fill(bad, torch.nan)

    attn = None
    if return_attn:
        with torch.no_grad():
            s = plan.s
            slot_pos = layout.perm.reshape(b, -1)  # (b, total) position of each slot
            q_pos = slot_pos.view(-1, s)  # (windows, s)
            k_pos = key_windows(with_wrap(slot_pos, c), s, plan.width).flatten(0, 1)  # (windows, c + s)
            flat_index = q_pos[:, :, None] * lp + k_pos[:, None, :]  # (windows, s, c + s)
            attn = probs.new_zeros(b, lp * lp)
            attn.scatter_add_(1, flat_index.view(b, -1), (probs * slot_weight.view(-1, s, 1)).view(b, -1))
            attn = attn.view(b, lp, lp)[:, :length, :length]
    return out, attn
