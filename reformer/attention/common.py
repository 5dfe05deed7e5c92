"""Pieces shared by every attention path: mask constants, input checks, key normalisation."""

from __future__ import annotations

import torch

#: Logit given to a query's own key: large but finite, so a query whose every other key
#: is masked still attends to itself (and never produces NaN). Representable in fp16.
SELF_ATTN_VALUE = -5e4


def masked_value(dtype: torch.dtype) -> float:
    """Logit for a hidden key: the most negative finite value of ``dtype`` (never -inf)."""
    return -torch.finfo(dtype).max


def normalize_keys(qk: torch.Tensor) -> torch.Tensor:
    """Shared-QK keys: ``qk / ||qk||`` along the last dim; a zero vector (e.g. padding) stays zero."""
    return unit_keys_and_norms(qk)[0]


def unit_keys_and_norms(qk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`normalize_keys` and the norms ``(..., 1)`` it divided by (before the floor)."""
    # (autocast computes the norm in fp32; keep the keys in the dtype of the queries)
    norm = qk.norm(dim=-1, keepdim=True)
    return (qk / norm.clamp_min(norm_floor(norm.dtype))).to(qk.dtype), norm


def norm_floor(dtype: torch.dtype) -> float:
    """Smallest norm :func:`normalize_keys` divides by: 1e-12, or the dtype's smallest normal
    number where 1e-12 is 0 (fp16; 0 / 0 would be NaN)."""
    return max(1e-12, torch.finfo(dtype).tiny)


def check_qkv(qk: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    """Raise a clear error for tensors that do not form a ``(batch, len, d)`` attention input."""
    for name, t in (("qk", qk), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (batch, len, dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if qk.shape[:2] != v.shape[:2]:
        raise ValueError(f"qk and v must agree in (batch, len): qk is {tuple(qk.shape)}, v is {tuple(v.shape)}")
    if qk.dtype != v.dtype:
        raise ValueError(f"qk and v must have the same dtype, got {qk.dtype} and {v.dtype}")
    if qk.shape[1] == 0:
        raise ValueError("qk must have at least one position (len >= 1)")
    check_mask("input_mask", key_mask, qk.shape[:2])


def check_features(name: str, x: object, dim: int) -> None:
    """``x`` must be a floating-point ``(batch, len, dim)`` tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (batch, len, {dim}), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """A mask is a bool tensor of exactly ``shape`` (True = attend), or None."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor (True = keep), got {got}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def check_extra_keys(keys: torch.Tensor | None, context_mask: torch.Tensor | None, batch: int, dim: int) -> int:
    """Extra keys every query may see, ``(batch, c, dim)``, and their ``context_mask``
    ``(batch, c)`` (bool, True = real); returns ``c`` (0 without keys)."""
    if keys is None:
        if context_mask is not None:
            raise ValueError("context_mask was given without keys")
        return 0
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.shape[0] != batch or keys.shape[2] != dim:
        got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys must have shape ({batch}, n_keys, {dim}), got {got}")
    check_mask("context_mask", context_mask, (batch, keys.shape[1]))
    return keys.shape[1]


def self_logit(dtype: torch.dtype, self_value: float = SELF_ATTN_VALUE) -> float:
    """Logit of a query's own key in ``dtype``: fp16 always uses :data:`SELF_ATTN_VALUE`,
    the value it can represent."""
    return SELF_ATTN_VALUE if dtype == torch.float16 else self_value


def fill_masked_(
    dots: torch.Tensor, hidden: torch.Tensor | None, is_self: torch.Tensor, self_value: float = SELF_ATTN_VALUE
) -> torch.Tensor:
    """In place: ``hidden`` logits get the dtype's most negative value, the query's own key
    ``self_value`` (so it is used only when nothing else is visible; see :func:`self_logit`)."""
    if hidden is not None:
        dots.masked_fill_(hidden, masked_value(dots.dtype))
    return dots.masked_fill_(is_self, self_logit(dots.dtype, self_value))


def quarantine_non_finite(
    keys: torch.Tensor, values: torch.Tensor, key_fill: float = torch.nan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-finite inputs reach exactly the outputs that see them: ``keys`` ``(..., n, d)`` all
    NaN at a position whose key or value ``(..., n, dv)`` has a non-finite entry, the values with
    their non-finite entries replaced by 0, and those positions ``bad`` ``(..., n, 1)``, whose
    own outputs the caller sets to NaN.

    A hidden key's weight is exactly 0, but 0 * NaN is NaN: a non-finite value at a later
    position would turn every earlier output into NaN through ``p @ v``. Zeroing it stops that;
    its NaN key still reaches every query that sees it (a NaN logit, so a NaN softmax row), while
    hidden logits are replaced by a masked fill. (A whole NaN row, not an inf entry: an infinite
    key gives logits of either sign, which a softmax may round to weights.) The own key's logit
    is a constant (:data:`SELF_ATTN_VALUE`), so a query that sees only itself needs ``bad``.
    ``key_fill=0`` is for kernels that mask by adding a bias (SDPA): the caller then marks the
    outputs that see ``bad`` itself (:func:`reach_of`). Costs one elementwise pass over each tensor.

    Eager, when every entry is finite (one host sync), the inputs come back as they are: two
    full-size copies per call would cost memory traffic, and fresh heap pages every step where
    freed memory is left to glibc. Compiled, the copies stay (no sync), fused by the compiler."""
    finite = values.isfinite()
    bad = ~(finite.all(-1, keepdim=True) & keys.isfinite().all(-1, keepdim=True))  # (..., n, 1)
    if not torch.compiler.is_compiling() and not bool(bad.any()):
        return keys, values, bad
    return keys.masked_fill(bad, key_fill), values.masked_fill(~finite, 0), bad


def reach_of(keys: torch.Tensor, real: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """``(..., n or 1)`` bool: whether each query of dense attention sees one of ``keys``
    ``(..., n)`` (bool): a ``real`` one (True = not masked out; None = all), an earlier one when
    ``causal``, or its own."""
    visible = keys if real is None else keys & real
    seen = visible.cummax(dim=-1).values if causal else visible.any(-1, keepdim=True)
    return seen | keys


def masked_softmax(dots: torch.Tensor, hidden: torch.Tensor | None, is_self: torch.Tensor) -> torch.Tensor:
    """Attention weights over the last dim of ``dots`` (a fresh matmul output, overwritten)."""
    return torch.softmax(fill_masked_(dots, hidden, is_self), dim=-1)


# Attention dropout is counter-based: whether query position i keeps key position j is a hash
# of (a per-call seed, the row - batch and head -, the round, i, j), not the next draw of a
# stream in the order the entries happen to be laid out. So a query's mask never depends on
# where other tokens hash (LSH sorts by bucket), and the backends agree on it. The seed is one
# draw of torch's RNG per call: torch.manual_seed fixes it and a reversible block's re-run,
# which replays the RNG state, draws it again. It stays a tensor: no host sync.

_MASK32 = 0xFFFFFFFF


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A seed ``()`` int64 in ``[0, 2^31)`` for :func:`dropout_keep`, drawn from torch's RNG on ``device``."""
    return torch.randint(0, 2**31, (), device=device)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """An avalanche of 32-bit ints held in int64 (multipliers below 2^31: products stay below 2^63)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x5BD1E995) & _MASK32
    return h ^ (h >> 16)


def dropout_keep(seed: torch.Tensor, p: float, *coords: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask, True with probability ``1 - p``, a function of ``seed`` and the int
    coordinates alone (broadcast together; give the small ones first: each is hashed at the
    shape reached so far)."""
    h = _mix32(seed)  # (mixed first: seed ^ row would collide for small seeds and rows)
    for c in coords:
        h = _mix32(h ^ (c & _MASK32))
    return h < round((1 - p) * 2**32)


def position_dropout(
    probs: torch.Tensor, p: float, row: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """``probs`` with entry (query ``q_pos``, key ``k_pos``) of ``row`` kept with probability
    ``1 - p`` and scaled by ``1 / (1 - p)`` (index tensors broadcast to ``probs``)."""
    keep = dropout_keep(dropout_seed(probs.device), p, row, q_pos, k_pos)
    return probs * keep / (1 - p)


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_prob(name: str, value: object) -> float:
    """``value`` as a float if it is a probability in [0, 1), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def resolve_dim_head(dim: int, heads: int, dim_head: int | None) -> int:
    """Per-head width: ``dim_head`` if given, else ``dim // heads`` (which must divide)."""
    check_int("dim", dim, 1)
    check_int("heads", heads, 1)
    if dim_head is None:
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) unless dim_head is given")
        dim_head = dim // heads
    return check_int("dim_head", dim_head, 1)
