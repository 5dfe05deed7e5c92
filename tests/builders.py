"""What many test files build: a tiny language model, random LSH attention inputs and the
options of a window-attention case. Test files import these (the ``tiny_lm`` fixture of
``conftest.py`` hands out :func:`tiny_lm`); keep them small, so the tests stay fast."""

from __future__ import annotations

import torch

from reformer import ReformerLM

#: The tiny causal byte-level LM most tests need: one layer, two heads, one chunk of 8 per 8 tokens.
TINY_LM = dict(num_tokens=256, dim=32, depth=1, heads=2, bucket_size=8, max_seq_len=64, causal=True)

#: ``(causal, strict_causal)``: bidirectional, strictly causal (the default), classic causal.
LSH_MODES = [(False, True), (True, True), (True, False)]


def tiny_lm(**overrides) -> ReformerLM:
    """A :data:`TINY_LM` model (in training mode); ``overrides`` change or add any option."""
    return ReformerLM(**{**TINY_LM, **overrides})


def lsh_inputs(
    length: int,
    n_hashes: int,
    masked: bool,
    d: int = 16,
    batch: int = 2,
    n_buckets: int = 4,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random ``qk``, ``v`` ``(batch, length, d)``, bucket ids ``(batch, n_hashes, length)`` in
    ``[0, n_buckets)`` and, when ``masked``, a key mask ``(batch, length)`` hiding about 30 %."""
    qk = torch.randn(batch, length, d, device=device, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(batch, length, d, device=device, dtype=dtype, requires_grad=requires_grad)
    buckets = torch.randint(0, n_buckets, (batch, n_hashes, length), device=device)
    key_mask = torch.rand(batch, length, device=device) > 0.3 if masked else None
    return qk, v, buckets, key_mask


def window_options(bucket_size: int, causal: bool, strict: bool, across: bool):
    """The options of one window-attention case (the n_buckets and key_mask go beside them)."""
    from reformer.attention.options import LSHOptions

    return LSHOptions(bucket_size=bucket_size, causal=causal, strict_causal=strict, attend_across_buckets=across)


def tied_projections(rows: int, width: int) -> torch.Tensor:
    """``(rows, width)`` projections (``width >= 6``) with the cases an ``argmax([x, -x])`` must
    get right: zero rows (every entry ties), two tied top entries, a bottom entry tied with the
    top's magnitude, and rows holding a NaN (rows 60-69)."""
    part = torch.randn(rows, width)
    part[:20] = 0  # zero vectors: every entry ties
    part[20:40, 5] = part[20:40, 2]  # exact tie between two top candidates
    part[40:60, 3] = -part[40:60].abs().amax(-1)  # bottom ties with the top's magnitude
    part[60:70, 1] = float("nan")
    return part
