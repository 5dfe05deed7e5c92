"""Local (sliding-block) shared-QK attention: each block of ``window_size`` positions attends
to itself and the previous block (and the next one with ``look_forward=1``).

Block boundaries are fixed by position, so the causal variant is strictly causal. Used by
``n_local_attn_heads`` and by local layers; the dense twin is
:func:`reformer.attention.reference.local_attention_reference`.

:class:`BlockLocalAttention` is the trax / Hugging Face variant (``local_qkv``): separate
queries and keys, plain scaled dot-product, wrap-around neighbour blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_features, check_int, check_mask, check_prob, resolve_dim_head
from .common import (
    fill_masked_,
    masked_softmax,
    masked_value,
    normalize_keys,
    position_dropout,
    quarantine_non_finite,
)
from .slots import padded_length


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
    """``qk``/``v`` ``(b, len, d)`` -> ``(b, len, dv)``.

    Without attention dropout in training the blocks go through ``scaled_dot_product_attention``
    (its fused kernels keep no ``(w, kw)`` weights for the backward) with the masks as an additive
    bias, as :func:`reformer.attention.full.full_qk_attention_sdpa` does: hidden keys the dtype's
    most negative value, the own key ``self_logit`` (weight 0 next to any visible key, 1 when
    nothing else is visible). NaN + bias is NaN, so non-finite keys and values are zeroed there
    and the outputs that see them set to NaN afterwards."""
    if look_forward not in (0, 1):
        raise ValueError(f"look_forward must be 0 or 1, got {look_forward!r}")
    b, length, d = qk.shape
    w = window_size
    explicit = dropout > 0 and training
    qk, v, bad = quarantine_non_finite(qk, v, key_fill=torch.nan if explicit else 0.0)
    lp = padded_length(length, w)
    pad = lp - length
    # (one row of key validity serves every batch row unless there is a mask)
    valid = torch.ones(1, length, dtype=torch.bool, device=qk.device) if key_mask is None else key_mask
    if pad:
        qk = F.pad(qk, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    n = lp // w
    q = qk.view(b, n, w, d)
    k = _neighbours(normalize_keys(qk).view(b, n, w, d), look_forward, 0.0)  # (b, n, kw, d)
    vv = _neighbours(v.view(b, n, w, -1), look_forward, 0.0)

    q_pos = torch.arange(lp, device=qk.device).view(1, n, w)
    k_pos = _neighbours(q_pos[..., None], look_forward, -1)[..., 0]  # (1, n, kw)
    k_valid = _neighbours(valid.view(valid.shape[0], n, w, 1), look_forward, False)[..., 0]  # (b or 1, n, kw)
    hidden = ~k_valid[:, :, None, :]  # (b or 1, n, 1, kw)
    if causal:
        hidden = hidden | (k_pos[..., None, :] > q_pos[..., :, None])  # (b or 1, n, w, kw)
    is_self = k_pos[..., None, :] == q_pos[..., :, None]  # (1, n, w, kw)
    if explicit:
        probs = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * d**-0.5, hidden, is_self)  # (b, n, w, kw)
        rows = torch.arange(b, device=qk.device)[:, None, None, None]
        probs = position_dropout(probs, dropout, rows, q_pos[..., :, None], k_pos[..., None, :])
        out = torch.matmul(probs, vv).view(b, lp, -1)
        return out[:, :length].masked_fill(bad, torch.nan)
    hidden = hidden.expand(-1, -1, w, -1)
    bias = fill_masked_(qk.new_zeros(hidden.shape), hidden, is_self)
    out = F.scaled_dot_product_attention(q, k, vv, attn_mask=bias, scale=d**-0.5).view(b, lp, -1)
    bad_keys = _neighbours(F.pad(bad, (0, 0, 0, pad)).view(b, n, w, 1), look_forward, False)[..., 0]  # (b, n, kw)
    sees_bad = _sees_bad(bad_keys & k_valid, w, causal).view(b, lp, 1)
    return out[:, :length].masked_fill(sees_bad[:, :length] | bad, torch.nan)


def _sees_bad(bad_keys: torch.Tensor, w: int, causal: bool) -> torch.Tensor:
    """``(b, n, w)``: whether each query of a block sees one of the (visible) ``bad_keys``
    ``(b, n, kw)`` of its window (previous block, own block, [next block]), its own key aside:
    counted per window, not per (query, key) pair."""
    if causal:  # query i of a block sees window slots 0 .. w + i - 1
        return bad_keys.cumsum(dim=-1)[..., w - 1 : 2 * w - 1] > 0
    total = bad_keys.sum(dim=-1, keepdim=True)  # (b, n, 1)
    return total - bad_keys[..., w : 2 * w].long() > 0


class BlockLocalAttention(nn.Module):
    """Local self-attention with separate query/key/value projections (trax / Hugging Face
    "local" layers): blocks of ``chunk_size`` positions attend to ``chunks_before`` previous and
    ``chunks_after`` next blocks with plain scaled dot-product logits and no self-masking.

    Neighbour blocks wrap around the sequence ends as in trax (the first block's predecessor
    is the last one; causal masking hides such keys). A sequence of at most ``chunk_size``
    positions is one block that attends to all of itself. Longer ones are padded with masked
    positions to a multiple of ``chunk_size``.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        chunk_size: int = 64,
        *,
        dim_head: int | None = None,
        chunks_before: int = 1,
        chunks_after: int = 0,
        causal: bool = False,
        dropout: float = 0.0,
        post_attn_dropout: float = 0.0,
        out_bias: bool = True,
    ):
        super().__init__()
        self.dim, self.heads, self.dim_head = dim, heads, resolve_dim_head(dim, heads, dim_head)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        self.chunks_before = check_int("chunks_before", chunks_before, 0)
        self.chunks_after = check_int("chunks_after", chunks_after, 0)
        self.causal = bool(causal)
        self.attn_dropout = check_prob("dropout", dropout)
        inner = self.heads * self.dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)
        self.post_attn_dropout = nn.Dropout(check_prob("post_attn_dropout", post_attn_dropout))

    def _neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, h, n, c, ...)`` blocks -> ``(b, h, n, (before + 1 + after) * c, ...)``, wrapping."""
        if x.shape[2] == 1:  # a single block is the whole sequence
            return x
        offsets = range(-self.chunks_before, self.chunks_after + 1)
        return torch.cat([x.roll(-i, dims=2) for i in offsets], dim=3)

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor | None = None,
        input_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(b, t, dim)``, ``input_mask`` ``(b, t)`` bool (True = real) -> ``(b, t, dim)``."""
        if keys is not None or context_mask is not None:
            raise ValueError("local_qkv layers attend within the sequence only: keys= is not supported")
        check_features("x", x, self.dim)
        b, t, _ = x.shape
        check_mask("input_mask", input_mask, (b, t))
        h, dh = self.heads, self.dim_head
        c = self.chunk_size if t > self.chunk_size else t
        lp = padded_length(t, c)
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device) if input_mask is None else input_mask
        valid = F.pad(valid, (0, lp - t), value=False)

        def blocks(proj: nn.Linear) -> torch.Tensor:  # (b, t, dim) -> (b, h, n, c, dh)
            y = F.pad(proj(x), (0, 0, 0, lp - t))
            return y.view(b, lp // c, c, h, dh).permute(0, 3, 1, 2, 4)

        q = blocks(self.to_q)
        k, v, _ = quarantine_non_finite(blocks(self.to_k), blocks(self.to_v))  # (no own-key logit here)
        k, v = self._neighbours(k * dh**-0.5), self._neighbours(v)  # (b, h, n, w, dh)
        dots = torch.matmul(q, k.transpose(-1, -2))  # (b, h, n, c, w)
        pos = torch.arange(lp, device=x.device).view(1, 1, lp // c, c)
        k_pos = self._neighbours(pos[..., None])[..., 0]  # (1, 1, n, w)
        hidden = ~self._neighbours(valid.view(b, 1, lp // c, c, 1))[..., None, :, 0]  # (b, 1, n, 1, w)
        if self.causal:
            hidden = hidden | (k_pos[..., None, :] > pos[..., None])
        probs = torch.softmax(dots.masked_fill(hidden, masked_value(dots.dtype)), dim=-1)
        if self.attn_dropout > 0 and self.training:
            rows = torch.arange(b * h, device=x.device).view(b, h, 1, 1, 1)  # (batch, head)
            probs = position_dropout(probs, self.attn_dropout, rows, pos[..., None], k_pos[..., None, :])
        out = torch.matmul(probs, v)  # (b, h, n, c, dh)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, lp, h * dh)[:, :t]
        return self.post_attn_dropout(self.to_out(out))
