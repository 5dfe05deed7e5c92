"""Which implementation computes LSH attention: the one place where the backend is chosen.

Each backend is one entry of :data:`BACKENDS`, which declares what it supports; ``"auto"``
tries :data:`AUTO_ORDER` in turn and takes the first that supports the call's options and can
run its inputs here. Forcing a backend outside what it supports raises an error that names the
option (``ValueError``) or the input or missing library (``RuntimeError``).

* ``"chunked"`` (:mod:`.chunked`): every option, any device; the CPU path.
* ``"triton"`` (:mod:`.triton_lsh`): fused kernel, CUDA (or CPU under ``TRITON_INTERPRET=1``).
* ``"flex"`` (:mod:`.flex`): ``torch.nn.attention.flex_attention`` with a sparse block mask;
  compiled on CUDA, eager (forward only) on CPU.
* ``"auto"``: chunked on CPU; on CUDA the first of triton, flex that supports the options,
  dtype and head dim, else chunked. (The order is provisional until the GPU benchmarks of
  ``benchmarks/gpu.py`` have run.)

The fused backends cover the common subset: no ``return_attn``, ``allow_duplicate_attention``
True, no attention dropout in training, ``exp_lse`` False.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .chunked import lsh_attention_chunked
from .common import quarantine_non_finite
from .slots import SlotInputs, SlotLayout, WindowRules, combine_rounds, sort_into_slots

#: Head dims the fused backends are built for (powers of two: tl.dot tiles, flex kernels).
FUSED_HEAD_DIMS = (16, 32, 64, 128)
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: What a backend may support beyond plain LSH attention (see :func:`used_features`).
FEATURES = ("causal", "key_mask", "return_attn", "duplicate_attention_off", "training_dropout", "exp_lse")

#: The options every backend takes (read once: ``inspect.signature`` is slow for a per-layer call).
_CHUNKED_SIGNATURE = inspect.signature(lsh_attention_chunked)
_DEFAULTS = {name: p.default for name, p in _CHUNKED_SIGNATURE.parameters.items() if p.default is not p.empty}

Options = dict  # lsh_attention_chunked's arguments by name, defaults applied (qk, v and buckets too)
Attention = Callable[[Options], tuple[torch.Tensor, torch.Tensor | None]]
WindowKernel = Callable[[SlotInputs, SlotLayout, WindowRules], tuple[torch.Tensor, torch.Tensor]]
Limits = Callable[[torch.Tensor, torch.Tensor, int], str | None]


@dataclass(frozen=True)
class Backend:
    """One way to compute :func:`.chunked.lsh_attention_chunked`'s result, and what it supports."""

    #: The result and attention weights (or None) of a call's options.
    attention: Attention
    #: Those of :data:`FEATURES` it supports.
    supports: frozenset[str] = frozenset(FEATURES)
    #: The dtypes and head dims (of ``qk`` and ``v``) it takes; None: any.
    dtypes: tuple[torch.dtype, ...] | None = None
    head_dims: tuple[int, ...] | None = None
    #: Why it cannot run ``(qk, v, bucket_size)`` here beyond those (a library, the device), or None.
    limits: Limits = lambda qk, v, bucket_size: None
    #: The device types on which ``"auto"`` may choose it; None: any.
    auto_devices: tuple[str, ...] | None = None

    def __post_init__(self):
        unknown = set(self.supports) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; each must be one of {FEATURES}")


def used_features(options: Options) -> dict[str, str]:
    """Those of :data:`FEATURES` that a call with ``options`` (those not given: the defaults) uses,
    each as an error names it."""
    options, used = {**_DEFAULTS, **options}, {}
    if options["return_attn"]:
        used["return_attn"] = "return_attn=True"
    if not options["allow_duplicate_attention"]:
        used["duplicate_attention_off"] = "allow_duplicate_attention=False"
    if options["dropout"] > 0 and options["training"]:
        used["training_dropout"] = f"dropout={options['dropout']} (attention dropout in training)"
    if options["exp_lse"]:
        used["exp_lse"] = "exp_lse=True"
    if options["causal"]:
        used["causal"] = "causal=True"
    if options["key_mask"] is not None:
        used["key_mask"] = "a key_mask"
    return used


def _fused_backend(load_kernel: Callable[[], WindowKernel], limits: Limits) -> Backend:
    """A fused per-slot window kernel (``load_kernel`` imports it on first use: optional
    dependencies) as a backend of the common subset, on the slots it sorts the inputs into."""

    def attention(opts: Options) -> tuple[torch.Tensor, None]:
        causal = opts["causal"]
        rules = WindowRules(causal, causal and opts["strict_causal"], opts["attend_across_buckets"], opts["self_value"])
        qk, v, bad = quarantine_non_finite(opts["qk"], opts["v"])
        inputs, layout = sort_into_slots(qk, v, opts["buckets"], opts["key_mask"], opts["bucket_size"],
                                         opts["n_buckets"])  # fmt: skip
        slot_out, slot_lse = load_kernel()(inputs, layout, rules)
        out, _ = combine_rounds(slot_out, slot_lse, layout, qk.shape[1])
        return out.masked_fill(bad, torch.nan), None

    return Backend(attention, supports=frozenset({"causal", "key_mask"}), dtypes=FUSED_DTYPES,
                   head_dims=FUSED_HEAD_DIMS, limits=limits, auto_devices=("cuda",))  # fmt: skip


def _triton_kernel() -> WindowKernel:
    from .triton_lsh import triton_window_attention

    return triton_window_attention


def _flex_kernel() -> WindowKernel:
    from .flex import flex_window_attention

    return flex_window_attention


def _triton_limits(qk: torch.Tensor, v: torch.Tensor, bucket_size: int) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'reformer-torch[gpu]')"
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
    "chunked": Backend(lambda opts: lsh_attention_chunked(**opts)),
    "flex": _fused_backend(_flex_kernel, _flex_limits),
    "triton": _fused_backend(_triton_kernel, _triton_limits),
}
#: The backends ``"auto"`` tries, in order; the last takes every call.
AUTO_ORDER = ("triton", "flex", "chunked")


def check_backend(backend: object) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    return backend


def unsupported_option(backend: Backend, options: Options) -> str | None:
    """The first option of the call (as ``name=value``) that ``backend`` does not support, or None."""
    return next((named for feature, named in used_features(options).items() if feature not in backend.supports), None)


def unavailable_reason(backend: str, qk: torch.Tensor, v: torch.Tensor, bucket_size: int) -> str | None:
    """Why ``backend`` cannot run on these inputs here (library, device, dtype, sizes), or None."""
    entry = BACKENDS[backend]
    if entry.dtypes is not None and qk.dtype not in entry.dtypes:
        return f"dtype {qk.dtype} (needs {_one_of([str(t).removeprefix('torch.') for t in entry.dtypes])})"
    if entry.head_dims is not None and not {qk.shape[-1], v.shape[-1]} <= set(entry.head_dims):
        return f"head dims {qk.shape[-1]}, {v.shape[-1]} (each must be one of {entry.head_dims})"
    return entry.limits(qk, v, bucket_size)


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def resolve_backend(requested: str, qk: torch.Tensor, v: torch.Tensor, options: Options) -> str:
    """The backend that computes this call: ``requested``, or for ``"auto"`` the first of
    :data:`AUTO_ORDER` that supports its options and runs its inputs here."""
    if requested != "auto":
        blocker = unsupported_option(BACKENDS[requested], options)
        if blocker is not None:
            raise ValueError(
                f"backend={requested!r} does not support {blocker}; use backend='chunked' (or 'auto', which falls back)"
            )
        reason = unavailable_reason(requested, qk, v, options["bucket_size"])
        if reason is not None:
            raise RuntimeError(f"backend={requested!r} cannot run here: {reason}")
        return requested
    used = used_features(options).keys()
    for name in AUTO_ORDER:
        entry = BACKENDS[name]
        if entry.auto_devices is not None and qk.device.type not in entry.auto_devices:
            continue
        if used <= entry.supports and unavailable_reason(name, qk, v, options["bucket_size"]) is None:
            return name
    raise RuntimeError(f"no backend of {AUTO_ORDER} supports these options and inputs here")


def lsh_attention(
    qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, *, backend: str = "auto", **options
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`.chunked.lsh_attention_chunked` (same arguments and result) computed by ``backend``."""
    bound = _CHUNKED_SIGNATURE.bind(qk, v, buckets, **options)
    bound.apply_defaults()
    opts = bound.arguments
    name = resolve_backend(check_backend(backend), qk, v, opts)
    return BACKENDS[name].attention(opts)
