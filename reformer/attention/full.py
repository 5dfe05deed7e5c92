"""Dense shared-QK attention with the LSH masks, for short sequences and comparison."""

from __future__ import annotations

import torch

from .common import masked_softmax, normalize_keys, position_dropout, quarantine_non_finite


def full_qk_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qk``/``v`` ``(b, len, d)`` -> ``(out (b, len, dv), attn (b, len, len))``."""
    length, d = qk.shape[1], qk.shape[2]
    qk, v, bad = quarantine_non_finite(qk, v)
    dots = torch.matmul(qk, normalize_keys(qk).transpose(-1, -2)) * d**-0.5  # (b, len, len)
    pos = torch.arange(length, device=qk.device)
    hidden = None
    if key_mask is not None:
        hidden = ~key_mask[:, None, :]
    if causal:
        future = (pos[None, :] > pos[:, None])[None]
        hidden = future if hidden is None else hidden | future
    is_self = torch.eye(length, dtype=torch.bool, device=qk.device)[None]
    probs = masked_softmax(dots, hidden, is_self)
    if dropout > 0 and training:
        rows = torch.arange(qk.shape[0], device=qk.device)[:, None, None]
        probs = position_dropout(probs, dropout, rows, pos[:, None], pos[None, :])
    return torch.matmul(probs, v).masked_fill(bad, torch.nan), probs
