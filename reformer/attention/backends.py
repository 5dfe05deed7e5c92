"""Which implementation computes LSH attention: the one place where the backend is chosen.

* ``"chunked"`` (:mod:`.chunked`): every option, any device; the CPU path.
* ``"triton"`` (:mod:`.triton_lsh`): fused kernel, CUDA (or CPU under ``TRITON_INTERPRET=1``).
* ``"flex"`` (:mod:`.flex`): ``torch.nn.attention.flex_attention`` with a sparse block mask;
  compiled on CUDA, eager (forward only) on CPU.
* ``"auto"``: chunked on CPU; on CUDA the first of triton, flex that supports the options,
  dtype and head dim, else chunked. (The order is provisional until the GPU benchmarks of
  ``benchmarks/gpu.py`` have run.)

The fused backends cover the common subset: no ``return_attn``, ``allow_duplicate_attention``
True, no attention dropout in training, ``exp_lse_softmax`` False. ``auto`` falls back to chunked
outside it; forcing a fused backend there raises an error that names the option.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .chunked import lsh_attention_chunked
from .common import quarantine_non_finite
from .slots import SlotInputs, SlotLayout, WindowRules, combine_rounds, sort_into_slots

if TYPE_CHECKING:  # (options.py imports check_backend from here)
    from .options import LSHOptions

BACKENDS = ("auto", "chunked", "flex", "triton")
#: Head dims the fused backends are built for (powers of two: tl.dot tiles, flex kernels).
FUSED_HEAD_DIMS = (16, 32, 64, 128)
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

WindowKernel = Callable[[SlotInputs, SlotLayout, WindowRules], tuple[torch.Tensor, torch.Tensor]]


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def unsupported_option(options: LSHOptions, training: bool, pair_mask: bool = False) -> str | None:
    """The first option (as ``name=value``) outside the fused backends' subset, or None
    (``pair_mask``: the call has an ``attn_mask``)."""
    if pair_mask:
        return "input_attn_mask"
    if options.return_attn:
        return "return_attn=True"
    if not options.allow_duplicate_attention:
        return "allow_duplicate_attention=False"
    if options.lsh_dropout > 0 and training:
        return f"lsh_dropout={options.lsh_dropout} (attention dropout in training)"
    if options.exp_lse_softmax:
        return "exp_lse_softmax=True"
    return None


def unavailable_reason(backend: str, qk: torch.Tensor, v: torch.Tensor, bucket_size: int) -> str | None:
    """Why ``backend`` cannot run on these inputs here (library, device, dtype, sizes), or None."""
    if qk.dtype not in FUSED_DTYPES:
        return f"dtype {qk.dtype} (needs float16, bfloat16 or float32)"
    if qk.shape[-1] not in FUSED_HEAD_DIMS or v.shape[-1] not in FUSED_HEAD_DIMS:
        return f"head dims {qk.shape[-1]}, {v.shape[-1]} (each must be one of {FUSED_HEAD_DIMS})"
    cuda = qk.device.type == "cuda"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'reformer-torch[gpu]')"
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            return f"device {qk.device} (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
        return None
    if not _flex_has_aux_lse():
        return f"torch {torch.__version__} has no flex_attention with AuxRequest(lse=True) (a newer torch has)"
    if cuda and bucket_size % 16:
        return f"bucket_size={bucket_size} (flex_attention blocks need a multiple of 16)"
    if not cuda and torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad):
        return f"device {qk.device} with gradients (flex_attention has no CPU backward)"
    return None


def _flex_has_aux_lse() -> bool:
    """flex.py asks for the log-sum-exp with ``return_aux=AuxRequest(lse=True)``, newer than torch 2.5."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(
    qk: torch.Tensor, v: torch.Tensor, options: LSHOptions, training: bool, pair_mask: bool = False
) -> str:
    """The backend that computes this call: ``options.attn_backend``, or for ``"auto"`` the first usable one."""
    requested = options.attn_backend
    if requested == "chunked":
        return requested
    blocker = unsupported_option(options, training, pair_mask)
    if requested == "auto":
        if qk.device.type != "cuda" or blocker is not None:
            return "chunked"
        usable = [b for b in ("triton", "flex") if unavailable_reason(b, qk, v, options.bucket_size) is None]
        return usable[0] if usable else "chunked"
    if blocker is not None:
        raise ValueError(
            f"attn_backend={requested!r} does not support {blocker}; use 'chunked' (or 'auto', which falls back)"
        )
    reason = unavailable_reason(requested, qk, v, options.bucket_size)
    if reason is not None:
        raise RuntimeError(f"attn_backend={requested!r} cannot run here: {reason}")
    return requested


def _window_kernel(backend: str) -> WindowKernel:
    """The fused per-slot window attention of ``backend`` (imported on first use: optional deps)."""
    if backend == "triton":
        from .triton_lsh import triton_window_attention

        return triton_window_attention
    from .flex import flex_window_attention

    return flex_window_attention


def lsh_attention(
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
    """:func:`.chunked.lsh_attention_chunked` (same arguments and result) computed by the
    backend ``options.attn_backend`` asks for (a fused one only without ``attn_mask``)."""
    name = resolve_backend(qk, v, options, training, attn_mask is not None)
    if name == "chunked":
        return lsh_attention_chunked(
            qk, v, buckets, options, n_buckets=n_buckets, key_mask=key_mask, attn_mask=attn_mask, training=training
        )
    causal = options.causal
    rules = WindowRules(
        causal, causal and options.strict_causal, options.attend_across_buckets, options.self_attn_value
    )
    qk, v, bad = quarantine_non_finite(qk, v)
    inputs, layout = sort_into_slots(qk, v, buckets, key_mask, options.bucket_size, n_buckets)
    slot_out, slot_lse = _window_kernel(name)(inputs, layout, rules)
    out, _ = combine_rounds(slot_out, slot_lse, layout, qk.shape[1])
    return out.masked_fill(bad, torch.nan), None
