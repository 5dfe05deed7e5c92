"""Dense shared-QK attention with the LSH masks, for short sequences and comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (
    fill_masked_,
    masked_softmax,
    normalize_keys,
    position_dropout,
    quarantine_non_finite,
    reach_of,
)


def full_qk_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    need_weights: bool = True,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``qk``/``v`` ``(b, len, d)`` -> ``(out (b, len, dv), attn (b, len, len) or None)``.

    ``allowed``: ``(b or 1, len, len)`` bool, the query-key pairs that may attend (see
    :func:`allowed_pairs`). ``need_weights=False`` (and no dropout in training, no ``allowed``)
    takes the fused path, :func:`full_qk_attention_sdpa`, and returns no weights."""
    if not need_weights and not (training and dropout > 0) and allowed is None:
        return full_qk_attention_sdpa(qk, v, causal=causal, key_mask=key_mask), None
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
    if allowed is not None:
        hidden = ~allowed if hidden is None else hidden | ~allowed
    is_self = torch.eye(length, dtype=torch.bool, device=qk.device)[None]
    probs = masked_softmax(dots, hidden, is_self)
    if dropout > 0 and training:
        rows = torch.arange(qk.shape[0], device=qk.device)[:, None, None]
        probs = position_dropout(probs, dropout, rows, pos[:, None], pos[None, :])
    return torch.matmul(probs, v).masked_fill(bad, torch.nan), probs


def allowed_pairs(
    input_attn_mask: torch.Tensor | None, length: int, query_len: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """The query-key pairs ``(b or 1, length, length)`` that ``reformer_pytorch``'s forward
    options allow, or None when they hide nothing: ``input_attn_mask`` ``(b, n, m)`` (True =
    allowed), padded with True to the full length; and when ``causal``, no key after its query,
    except the keys-only positions from ``query_len`` on, which every query sees."""
    allowed = None
    if input_attn_mask is not None:
        n, m = input_attn_mask.shape[1:]
        allowed = F.pad(input_attn_mask, (0, length - m, 0, length - n), value=True)
    if causal:
        pos = torch.arange(length, device=device)
        past = ~((pos[None, :] > pos[:, None]) & (pos[None, :] < query_len))[None]  # (1, length, length)
        allowed = past if allowed is None else allowed & past
    return allowed


def full_qk_attention_sdpa(
    qk: torch.Tensor, v: torch.Tensor, *, causal: bool = False, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`full_qk_attention`'s output on ``scaled_dot_product_attention``, whose fused CPU
    and GPU kernels keep no ``len x len`` weights (the rows go in as heads of one 4-D batch:
    3-D inputs take the unfused path on CPU).

    Causal without a padding mask, the self-mask is a shift: query ``i > 0`` sees exactly keys
    ``0..i-1`` (its own logit, ``self_logit``, has weight 0 in every float dtype next to any
    visible key), so it is plain causal attention of queries ``1..`` over keys ``..len-2``, and
    query 0, which sees only itself, returns its value. Otherwise the masks become an additive
    bias: hidden keys the dtype's most negative value, the own key ``self_logit`` (added to
    ``q.k``: still weight 0 next to a visible key, and 1 when nothing else is visible).

    SDPA hides keys by adding a bias, and NaN + bias is NaN: non-finite keys and values are
    zeroed instead, and the outputs that see them set to NaN (:func:`reach_of`)."""
    qk, v, bad = quarantine_non_finite(qk, v, key_fill=0.0)
    out = _full_sdpa(qk, v, causal, key_mask)
    return out.masked_fill(reach_of(bad[..., 0], key_mask, causal)[..., None], torch.nan)


def _full_sdpa(qk: torch.Tensor, v: torch.Tensor, causal: bool, key_mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`full_qk_attention_sdpa` of finite inputs."""
    length, scale = qk.shape[1], qk.shape[-1] ** -0.5
    keys = normalize_keys(qk)
    if causal and key_mask is None:
        if length == 1:
            return v
        rest = F.scaled_dot_product_attention(qk[None, :, 1:], keys[None, :, :-1], v[None, :, :-1], is_causal=True,
                                              scale=scale)[0]  # (b, len - 1, dv)  # fmt: skip
        return torch.cat([v[:, :1], rest], dim=1)
    pos = torch.arange(length, device=qk.device)
    hidden = (pos[None, :] > pos[:, None]) if causal else torch.zeros(length, length, dtype=torch.bool,
                                                                       device=qk.device)  # fmt: skip
    if key_mask is not None:
        hidden = hidden[None] | ~key_mask[:, None, :]  # (b, len, len)
    bias = fill_masked_(qk.new_zeros(hidden.shape), hidden, pos[:, None] == pos[None, :])
    return F.scaled_dot_product_attention(qk[None], keys[None], v[None], attn_mask=bias[None], scale=scale)[0]
