"""Local (sliding-block) shared-QK attention: each block of ``window_size`` positions attends
to itself and the previous block (and the next one with ``look_forward=1``).

Block boundaries are fixed by position, so the causal variant is strictly causal. Used by
``n_local_attn_heads`` and by local layers; the dense twin is
:func:`reformer.attention.reference.local_attention_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunked import padded_length
from .common import masked_softmax, normalize_keys


def _neighbours(x: torch.Tensor, look_forward: int, fill: float | bool) -> torch.Tensor:
    """``(b, n, w, ...)`` blocks -> ``(b, n, (2 + look_forward) * w, ...)``: previous, own,
    [next] block, with ``fill`` beyond the sequence ends (no wrap-around)."""
    edge = torch.full_like(x[:, :1], fill)
    parts = [torch.cat([edge, x[:, :-1]], dim=1), x]
    if look_forward:
        parts.append(torch.cat([x[:, 1:], edge], dim=1))
    return torch.cat(parts, dim=2)


def local_attention_chunked(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    window_size: int,
    causal: bool = False,
    look_forward: int = 0,
    key_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``qk``/``v`` ``(b, len, d)`` -> ``(b, len, dv)``."""
    if look_forward not in (0, 1):
        raise ValueError(f"look_forward must be 0 or 1, got {look_forward!r}")
    b, length, d = qk.shape
    w = window_size
    lp = padded_length(length, w)
    pad = lp - length
    valid = torch.ones(b, length, dtype=torch.bool, device=qk.device) if key_mask is None else key_mask
    if pad:
        qk = F.pad(qk, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    n = lp // w
    q = qk.view(b, n, w, d)
    k = _neighbours(normalize_keys(qk).view(b, n, w, d), look_forward, 0.0)  # (b, n, kw, d)
    vv = _neighbours(v.view(b, n, w, -1), look_forward, 0.0)
    dots = torch.matmul(q, k.transpose(-1, -2)) * d**-0.5  # (b, n, w, kw)

    q_pos = torch.arange(lp, device=qk.device).view(1, n, w)
    k_pos = _neighbours(q_pos[..., None], look_forward, -1)[..., 0]  # (1, n, kw)
    k_valid = _neighbours(valid.view(b, n, w, 1), look_forward, False)[..., 0]  # (b, n, kw)
    hidden = ~k_valid[:, :, None, :]
    if causal:
        hidden = hidden | (k_pos[..., None, :] > q_pos[..., :, None])
    is_self = k_pos[..., None, :] == q_pos[..., :, None]
    probs = masked_softmax(dots, hidden, is_self, dropout, training)
    out = torch.matmul(probs, vv).view(b, lp, -1)
    return out[:, :length]
