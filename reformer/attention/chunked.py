"""Portable LSH attention: sort by bucket, split into chunks, attend within (chunk, previous).

This is the fast path on CPU (and the fallback everywhere). It computes exactly the
function of :func:`reformer.attention.reference.lsh_attention_reference`; see that module
and DESIGN.md section 3 for the contract.

Here: the entry point, :func:`lsh_attention_chunked`, and the autograd function around the
windows. The work is split by job:

* :mod:`.window_plan` - the windows (which keys each holds, ``s`` queries per window), their
  masks and their blocks;
* :mod:`.window_torch` - their attention in torch ops, block by block (any device and dtype);
* :mod:`.window_kernels` - the same with the CPU C kernels of :mod:`reformer.native.kernels`
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

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .common import quarantine_non_finite
from .lsh_op import lsh_windows_op
from .slots import cpu_kernels_for, pad_and_sort
from .window_kernels import KernelWindows
from .window_plan import build_plan, key_windows, queries_per_window, with_wrap
from .window_torch import TorchWindows

if TYPE_CHECKING:  # (options.py imports the backends, which import this module)
    from .options import LSHOptions


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
        qkv, norm, out, all_probs, slot_weight = _windows_forward(path, qk, v, save or keep_probs)
        if save:
            ctx.save_for_backward(qkv, norm, out, all_probs, slot_weight)
            ctx.path = path
        kept = all_probs if keep_probs else qk.new_empty(0)
        ctx.mark_non_differentiable(kept, slot_weight)
        return out, kept, slot_weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_probs, _grad_weight):
        return (*_windows_grads(ctx.path, *ctx.saved_tensors, grad_out), None, None, None)


def _windows_forward(path: TorchWindows, qk: torch.Tensor, v: torch.Tensor, keep_probs: bool):
    """The windows' forward on the flat ``qk`` ``(b * lp, d)`` and ``v`` ``(b * lp, dv)``: the
    packed rows ``(b * lp, 2d + dv)``, the norms ``(b * lp, 1)``, ``out`` ``(b, lp, dv)``, the
    probabilities ``(windows, s, c + s)`` (None unless ``keep_probs``) and the slots' round
    weights ``(b, total)`` - what :func:`_windows_grads` takes."""
    plan = path.plan
    qkv, norm = path.pack_qkv(qk, v)
    all_probs = qk.new_empty(plan.n_windows, plan.s, plan.width) if keep_probs else None
    out, slot_weight = path.forward(qkv, all_probs)  # (b, lp, dv), (b * total,)
    return qkv, norm, out, all_probs, slot_weight.view(plan.rows, -1)


def _windows_grads(path: TorchWindows, qkv, norm, out, all_probs, slot_weight, grad_out):
    """The gradients of the flat ``qk`` ``(b * lp, d)`` and ``v`` ``(b * lp, dv)`` for ``grad_out``
    ``(b, lp, dv)``, from what :class:`_LSHWindows`'s forward computed."""
    grad = path.backward(qkv, all_probs, grad_out, out, slot_weight)  # (b * lp, 2d + dv)
    return path.qk_grad(qkv, norm, grad), grad[:, 2 * path.d :]


def lsh_attention_chunked(
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    options: LSHOptions,
    *,
    n_buckets: int,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LSH attention on ``qk``/``v`` ``(b, len, d)`` with ``buckets`` ``(b, n_hashes, len)``.

    ``options``: the :class:`~.options.LSHOptions` of the call (``n_hashes``, the hashing
    options and ``attn_backend`` are not read here). ``n_buckets`` is the total number of
    bucket ids; ``key_mask`` ``(b, len)`` bool, True = attendable; ``attn_mask`` ``(b, len,
    len)`` bool, the query-key pairs that may attend. ``exp_lse_softmax``: attention and round
    weights are ``exp(x - logsumexp(x))`` as in trax / Hugging Face instead of a softmax - the
    same but for rounding, which shows where a query sees only itself (``x ~ self_attn_value``).
    Returns ``(out (b, len, dv), attn (b, len, len) or None)``. Under ``torch.compile`` the
    windows run as an operator (:mod:`.lsh_op`).
    """
    qk, v, bad = quarantine_non_finite(qk, v)
    windows = lsh_windows_op if torch.compiler.is_compiling() else lsh_windows
    out, attn = windows(
        qk, v, buckets, options, n_buckets=n_buckets, key_mask=key_mask, attn_mask=attn_mask, training=training
    )
    return out.masked_fill(bad, torch.nan), attn


def _planned(qk, v, buckets, options: LSHOptions, n_buckets, key_mask, attn_mask, training, dropout_seed):
    """The windows' implementation (its plan inside) and the flat padded inputs ``(b * lp, .)``."""
    b, length, d = qk.shape
    dv = v.shape[-1]
    strict = options.causal and options.strict_causal
    c = options.bucket_size
    kernels = cpu_kernels_for(qk, c + queries_per_window(c, strict), d + dv)  # the one decision of the call
    qk, v, layout = pad_and_sort(qk, v, buckets, key_mask, c, n_buckets, kernels)
    plan = build_plan(
        layout,
        options,
        d=d,
        dv=dv,
        n_buckets=n_buckets,
        training=training,
        kernels=kernels.windows,
        attn_mask=attn_mask,
        dropout_seed=dropout_seed,
    )
    path = (KernelWindows if plan.kernels else TorchWindows)(plan, d, dv)
    return path, qk.reshape(b * layout.lp, d), v.to(qk.dtype).reshape(b * layout.lp, dv)


def lsh_windows(
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    options: LSHOptions,
    *,
    n_buckets: int,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    training: bool = False,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`lsh_attention_chunked` of finite inputs; ``dropout_seed`` ``()`` int64: the seed of
    the attention dropout in training (None: drawn from torch's RNG)."""
    b, length, _ = qk.shape
    path, flat_qk, flat_v = _planned(qk, v, buckets, options, n_buckets, key_mask, attn_mask, training, dropout_seed)
    save = torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad)
    out, probs, slot_weight = _LSHWindows.apply(flat_qk, flat_v, path, options.return_attn, save)
    attn = _dense_attention(path.plan, probs, slot_weight, length) if options.return_attn else None
    return out[:, :length], attn


def lsh_windows_backward(
    grad_out: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    options: LSHOptions,
    *,
    n_buckets: int,
    key_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    training: bool,
    dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``qk`` and ``v`` for ``grad_out`` ``(b, len, dv)`` of :func:`lsh_windows`
    (called with the same arguments), without autograd: its forward again, then its backward."""
    b, length, d = qk.shape
    path, flat_qk, flat_v = _planned(qk, v, buckets, options, n_buckets, key_mask, attn_mask, training, dropout_seed)
    lp = path.plan.lp
    forward = _windows_forward(path, flat_qk, flat_v, keep_probs=True)
    grad_qk, grad_v = _windows_grads(path, *forward, F.pad(grad_out, (0, 0, 0, lp - length)))  # (b * lp, .) each
    return grad_qk.view(b, lp, d)[:, :length], grad_v.view(b, lp, -1)[:, :length].to(v.dtype)


def _dense_attention(plan, probs: torch.Tensor, slot_weight: torch.Tensor, length: int) -> torch.Tensor:
    """The ``(b, length, length)`` attention of the windows' ``probs`` ``(windows, s, c + s)``
    weighted by the slots' round weights ``(b, total)`` (for ``return_attn``)."""
    with torch.no_grad():
        b, lp, s, c = plan.rows, plan.lp, plan.s, plan.c
        slot_pos = plan.slot_row % lp  # (b, total) position of each slot in its row
        q_pos = slot_pos.view(-1, s)  # (windows, s)
        k_pos = key_windows(with_wrap(slot_pos, c), s, plan.width).flatten(0, 1)  # (windows, c + s)
        flat_index = q_pos[:, :, None] * lp + k_pos[:, None, :]  # (windows, s, c + s)
        attn = probs.new_zeros(b, lp * lp)
        attn.scatter_add_(1, flat_index.view(b, -1), (probs * slot_weight.view(-1, s, 1)).view(b, -1))
        return attn.view(b, lp, lp)[:, :length, :length]
