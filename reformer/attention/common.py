"""Pieces shared by every attention path: mask constants, key normalisation, masked softmax,
non-finite quarantine, counter-based dropout. (Input checks: :mod:`reformer.checks`.)"""

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
