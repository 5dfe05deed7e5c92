"""Which implementation computes LSH attention: the one place where the backend is chosen.

Each backend is one entry of :data:`BACKENDS`, which declares what it supports; ``"auto"``
tries :data:`AUTO_ORDER` in turn and takes the first that supports the call's options and can
run its inputs here. Forcing a backend outside what it supports raises an error that names the
option (``ValueError``) or the input or missing library (``RuntimeError``).

* ``"chunked"`` (:mod:`.chunked`): every option, any device; the CPU path.
* ``"triton"`` (:mod:`.triton_lsh`): fused kernel, CUDA (or CPU under ``TRITON_INTERPRET=1``).
* ``"flex"`` (:mod:`.flex`): ``torch.nn.attention.flex_attention`` with a sparse block mask;
  compiled on CUDA, eager (forward only) on CPU.

``auto`` is chunked on CPU; on CUDA the first of triton, flex that supports the call, else
chunked (the order is provisional until the GPU benchmarks of ``benchmarks/gpu.py`` have run).
The fused backends cover the common subset: causal or not, a key mask; no ``input_attn_mask``,
``return_attn``, ``allow_duplicate_attention=False``, attention dropout in training or
``exp_lse_softmax``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .chunked import lsh_attention_chunked
from .common import quarantine_non_finite
from .slots import SlotInputs, SlotLayout, WindowRules, combine_rounds, sort_into_slots

if TYPE_CHECKING:  # (options.py imports check_backend from here)
    from .options import LSHOptions

#: Head dims the fused backends are built for (powers of two: tl.dot tiles, flex kernels).
FUSED_HEAD_DIMS = (16, 32, 64, 128)
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: What a backend may support beyond plain LSH attention (see :func:`used_features`).
FEATURES = ("causal", "key_mask", "pair_mask", "return_attn", "duplicate_attention_off", "training_dropout", "exp_lse")

#: ``lsh_attention_chunked``'s signature: every backend computes that result.
Attention = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
WindowKernel = Callable[[SlotInputs, SlotLayout, WindowRules], tuple[torch.Tensor, torch.Tensor]]
#: Why a backend cannot run ``(qk, v, bucket_size)`` here (a library, the device), or None.
Limits = Callable[[torch.Tensor, torch.Tensor, int], str | None]


@dataclass(frozen=True)
class Backend:
    """One way to compute :func:`.chunked.lsh_attention_chunked`'s result, and what it supports."""

    attention: Attention
    #: Those of :data:`FEATURES` it supports.
    supports: frozenset[str] = frozenset(FEATURES)
    #: The dtypes and head dims (of ``qk`` and ``v``) it takes; None: any.
    dtypes: tuple[torch.dtype, ...] | None = None
    head_dims: tuple[int, ...] | None = None
    limits: Limits = lambda qk, v, bucket_size: None
    #: The device types on which ``"auto"`` may choose it; None: any.
    auto_devices: tuple[str, ...] | None = None

    def __post_init__(self):
        unknown = set(self.supports) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; each must be one of {FEATURES}")


def used_features(options: LSHOptions, training: bool, key_mask: bool = False, pair_mask: bool = False) -> list[str]:
    """Those of :data:`FEATURES` that a call uses (``key_mask``/``pair_mask``: the call has a key
    mask / an ``attn_mask``)."""
    uses = {
        "pair_mask": pair_mask,
        "return_attn": options.return_attn,
        "duplicate_attention_off": not options.allow_duplicate_attention,
        "training_dropout": training and options.lsh_dropout > 0,
        "exp_lse": options.exp_lse_softmax,
        "causal": options.causal,
        "key_mask": key_mask,
    }
    return [feature for feature, used in uses.items() if used]


def feature_name(feature: str, options: LSHOptions) -> str:
    """How an error names a feature of :data:`FEATURES` that a call with ``options`` uses."""
    if feature == "training_dropout":
        return f"lsh_dropout={options.lsh_dropout} (attention dropout in training)"
    names = {"pair_mask": "input_attn_mask", "return_attn": "return_attn=True", "causal": "causal=True",
             "duplicate_attention_off": "allow_duplicate_attention=False", "exp_lse": "exp_lse_softmax=True",
             "key_mask": "a key mask"}  # fmt: skip
    return names[feature]


def _fused_backend(load_kernel: Callable[[], WindowKernel], limits: Limits) -> Backend:
    """A fused per-slot window kernel (``load_kernel`` imports it on first use: optional
    dependencies) as a backend of the common subset, on the slots it sorts the inputs into."""

    def attention(qk, v, buckets, options: LSHOptions, *, n_buckets: int, key_mask=None, attn_mask=None,
                  training: bool = False) -> tuple[torch.Tensor, None]:  # fmt: skip
        causal = options.causal
        rules = WindowRules(causal, causal and options.strict_causal, options.attend_across_buckets,
                            options.self_attn_value)  # fmt: skip
        qk, v, bad = quarantine_non_finite(qk, v)
        inputs, layout = sort_into_slots(qk, v, buckets, key_mask, options.bucket_size, n_buckets)
        slot_out, slot_lse = load_kernel()(inputs, layout, rules)
        out, _ = combine_rounds(slot_out, slot_lse, layout, qk.shape[1])
        return out.masked_fill(bad, torch.nan), None

    subset = frozenset({"causal", "key_mask"})
    return Backend(attention, subset, FUSED_DTYPES, FUSED_HEAD_DIMS, limits, auto_devices=("cuda",))


def _triton_kernel() -> WindowKernel:
    from .triton_lsh import triton_window_attention

    return triton_window_attention


def _flex_kernel() -> WindowKernel:
    from .flex import flex_window_attention

    return flex_window_attention


def _triton_limits(qk: torch.Tensor, v: torch.Tensor, bucket_size: int) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'reformer-torch[gpu]')"
    if not hasattr(torch.library, "triton_op"):  # the kernel is an operator pair defined with it
        return f"torch {torch.__version__} has no torch.library.triton_op (torch >= 2.6 has)"
    if qk.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device {qk.device} (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    return None


def _flex_limits(qk: torch.Tensor, v: torch.Tensor, bucket_size: int) -> str | None:
    if not _flex_has_aux_lse():
        return f"torch {torch.__version__} has no flex_attention with AuxRequest(lse=True) (a newer torch has)"
    cuda = qk.device.type == "cuda"
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


#: Every backend by name. A new one is an entry here and a place in :data:`AUTO_ORDER`.
BACKENDS: dict[str, Backend] = {
    "chunked": Backend(lsh_attention_chunked),
    "flex": _fused_backend(_flex_kernel, _flex_limits),
    "triton": _fused_backend(_triton_kernel, _triton_limits),
}
#: The backends ``"auto"`` tries, in order; the last takes every call.
AUTO_ORDER = ("triton", "flex", "chunked")


def check_backend(backend: object) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    return backend


def unsupported_feature(backend: str, used: list[str]) -> str | None:
    """The first of the ``used`` features (see :func:`used_features`) that ``backend`` does not
    support, or None."""
    return next((feature for feature in used if feature not in BACKENDS[backend].supports), None)


def unavailable_reason(backend: str, qk: torch.Tensor, v: torch.Tensor, bucket_size: int) -> str | None:
    """Why ``backend`` cannot run on these inputs here (dtype, head dims, library, device), or None."""
    entry = BACKENDS[backend]
    if entry.dtypes is not None and qk.dtype not in entry.dtypes:
        return f"dtype {qk.dtype} (needs {_one_of([str(t).removeprefix('torch.') for t in entry.dtypes])})"
    if entry.head_dims is not None and not {qk.shape[-1], v.shape[-1]} <= set(entry.head_dims):
        return f"head dims {qk.shape[-1]}, {v.shape[-1]} (each must be one of {entry.head_dims})"
    return entry.limits(qk, v, bucket_size)


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def resolve_backend(
    qk: torch.Tensor, v: torch.Tensor, options: LSHOptions, training: bool, key_mask: bool = False,
    pair_mask: bool = False,
) -> str:  # fmt: skip
    """The backend that computes this call: ``options.attn_backend``, or for ``"auto"`` the first
    of :data:`AUTO_ORDER` that supports its options and runs its inputs here."""
    requested, used = options.attn_backend, used_features(options, training, key_mask, pair_mask)
    if requested == "auto":
        return next(
            name for name in AUTO_ORDER
            if (BACKENDS[name].auto_devices is None or qk.device.type in BACKENDS[name].auto_devices)
            and unsupported_feature(name, used) is None
            and unavailable_reason(name, qk, v, options.bucket_size) is None
        )  # fmt: skip
    blocker = unsupported_feature(requested, used)
    if blocker is not None:
        raise ValueError(f"attn_backend={requested!r} does not support {feature_name(blocker, options)}; "
                         "use 'chunked' (or 'auto', which falls back)")  # fmt: skip
    reason = unavailable_reason(requested, qk, v, options.bucket_size)
    if reason is not None:
        raise RuntimeError(f"attn_backend={requested!r} cannot run here: {reason}")
    return requested


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
    backend that :func:`resolve_backend` chooses."""
    name = resolve_backend(qk, v, options, training, key_mask is not None, attn_mask is not None)
    return BACKENDS[name].attention(
        qk, v, buckets, options, n_buckets=n_buckets, key_mask=key_mask, attn_mask=attn_mask, training=training
    )
