"""The chunked LSH attention's windows as PyTorch operators, for ``torch.compile``.

Dynamo cannot trace the windows' insides (the CPU C kernels called through ctypes, the worker
threads, the hand-written autograd function), so under ``torch.compile`` they run as two opaque
operators that the compiled graph calls: ``reformer::lsh_windows`` (eager code inside: the C
kernels and threads serve as they do without compiling) and ``reformer::lsh_windows_backward``,
registered as its gradient. The backward runs the windows' forward again, then their backward:
the graph keeps only the operator's inputs, for the price of one more attention forward per
training step. The attention dropout's seed is drawn in the graph and is an input of both, so
they drop the same entries, and an operator run again (activation checkpointing) computes the
same. The compiled graph sees only their shapes
(``register_fake``); ``torch.library.opcheck`` tests them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import TYPE_CHECKING

import torch

from .common import dropout_seed

if TYPE_CHECKING:  # (chunked.py imports this module; options.py imports the backends, which import chunked.py)
    from .options import LSHOptions


def lsh_windows_op(
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
    """:func:`.chunked.lsh_windows` (same arguments and result) through the operator."""
    dropped = training and options.lsh_dropout > 0  # (drawn only then, as without compiling)
    seed = dropout_seed(qk.device) if dropped else torch.zeros((), dtype=torch.int64, device=qk.device)
    out, attn = torch.ops.reformer.lsh_windows(
        qk, v, buckets, key_mask, attn_mask, _encode(options), n_buckets, training, seed
    )
    return out, attn if options.return_attn else None


@torch.compiler.assume_constant_result  # (Dynamo cannot trace json; the options are constants of the graph)
def _encode(options: LSHOptions) -> str:
    return json.dumps(dataclasses.asdict(options), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _decode(options: str) -> LSHOptions:
    from .options import LSHOptions

    fields = json.loads(options)
    if isinstance(fields["n_buckets"], list):  # (a factorised bucket count: a tuple)
        fields["n_buckets"] = tuple(fields["n_buckets"])
    return LSHOptions(**fields)


@torch.library.custom_op("reformer::lsh_windows", mutates_args=())
def _forward(
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    key_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    options: str,
    n_buckets: int,
    training: bool,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (b, len, dv), attn (b, len, len) or (0,))``; ``seed`` ``()``: the attention dropout's."""
    from .chunked import lsh_windows

    out, attn = lsh_windows(
        qk, v, buckets, _decode(options), n_buckets=n_buckets, key_mask=key_mask, attn_mask=attn_mask,
        training=training, dropout_seed=seed,
    )  # fmt: skip
    return out.contiguous(), qk.new_empty(0) if attn is None else attn.contiguous()


@_forward.register_fake
def _(qk, v, buckets, key_mask, attn_mask, options, n_buckets, training, seed):
    b, length, _ = qk.shape
    attn = qk.new_empty(b, length, length) if _decode(options).return_attn else qk.new_empty(0)
    return qk.new_empty(b, length, v.shape[-1]), attn


@torch.library.custom_op("reformer::lsh_windows_backward", mutates_args=())
def _backward(
    grad_out: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    buckets: torch.Tensor,
    key_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    options: str,
    n_buckets: int,
    training: bool,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``qk`` and ``v`` for ``grad_out``."""
    from .chunked import lsh_windows_backward

    grad_qk, grad_v = lsh_windows_backward(
        grad_out, qk, v, buckets, _decode(options), n_buckets=n_buckets, key_mask=key_mask, attn_mask=attn_mask,
        training=training, dropout_seed=seed,
    )  # fmt: skip
    return grad_qk.contiguous(), grad_v.contiguous()


@_backward.register_fake
def _(grad_out, qk, v, buckets, key_mask, attn_mask, options, n_buckets, training, seed):
    return torch.empty_like(qk), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    qk, v, buckets, key_mask, attn_mask, options, n_buckets, training, seed = inputs
    ctx.save_for_backward(qk, v, buckets, key_mask, attn_mask, seed)
    ctx.options, ctx.n_buckets, ctx.training = options, n_buckets, training


def _gradient(ctx, grad_out, _grad_attn):
    qk, v, buckets, key_mask, attn_mask, seed = ctx.saved_tensors
    grad_qk, grad_v = torch.ops.reformer.lsh_windows_backward(
        grad_out.contiguous(), qk, v, buckets, key_mask, attn_mask, ctx.options, ctx.n_buckets, ctx.training, seed
    )
    return grad_qk, grad_v, None, None, None, None, None, None, None


_forward.register_autograd(_gradient, setup_context=_setup_context)
