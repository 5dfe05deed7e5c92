"""Standard multi-head self-attention (separate query and key projections, dense O(L^2)) on
``scaled_dot_product_attention``: the Transformer baseline the Reformer is compared with
(``ReformerConfig(shared_qk=False)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_extra_keys, check_features, check_mask, check_prob, resolve_dim_head
from .common import reach_of


class DenseSelfAttention(nn.Module):
    """Multi-head attention of ``x`` ``(b, t, dim)`` over itself (and optional extra ``keys``)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        post_attn_dropout: float = 0.0,
        out_bias: bool = True,
    ):
        super().__init__()
        dim_head = resolve_dim_head(dim, heads, dim_head)
        self.dim, self.heads, self.dim_head, self.causal = dim, heads, dim_head, causal
        self.dropout = check_prob("dropout", dropout)
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)
        self.post_attn_dropout = nn.Dropout(check_prob("post_attn_dropout", post_attn_dropout))

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor | None = None,
        input_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(b, t, dim)``; ``keys`` ``(b, c, dim)`` extra keys every query sees; masks
        bool, True = real (``input_mask`` ``(b, t)``, ``context_mask`` ``(b, c)``). Returns
        ``(b, t, dim)``. A query whose every key is masked attends to itself."""
        check_features("x", x, self.dim)
        b, t, _ = x.shape
        check_mask("input_mask", input_mask, (b, t))
        c = check_extra_keys(keys, context_mask, b, self.dim)
        seq = x if keys is None else torch.cat([keys.to(x.dtype), x], dim=1)  # (b, c + t, dim)
        h, dh = self.heads, self.dim_head
        q = self.to_q(x).view(b, t, h, dh).transpose(1, 2)  # (b, h, t, dh)
        k, v = self.to_kv(seq).view(b, c + t, 2, h, dh).permute(2, 0, 3, 1, 4)  # 2 x (b, h, c + t, dh)
        drop = self.dropout if self.training else 0.0
        # SDPA hides keys by adding -inf, and 0 * NaN is NaN in p @ v: a non-finite key or value
        # would reach every query. They are zeroed, and the outputs that see them set to NaN.
        bad = ~(k.isfinite().all(-1) & v.isfinite().all(-1))  # (b, h, c + t)
        k, v = k.masked_fill(bad[..., None], 0), v.masked_fill(bad[..., None], 0)
        if keys is None and input_mask is None:  # the fused causal kernel needs no mask tensor
            real = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=self.causal)
        else:
            real = self._real_keys(b, t, c, input_mask, context_mask, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(real, t, c), dropout_p=drop)
        out = out.masked_fill(self._sees(bad, real, c)[..., None], torch.nan)
        return self.post_attn_dropout(self.to_out(out.transpose(1, 2).reshape(b, t, h * dh)))

    @staticmethod
    def _real_keys(b: int, t: int, c: int, input_mask, context_mask, device: torch.device) -> torch.Tensor:
        """``(b, c + t)`` bool: the keys that are not masked out."""
        real = torch.ones(b, c + t, dtype=torch.bool, device=device)
        if context_mask is not None:
            real[:, :c] = context_mask
        if input_mask is not None:
            real[:, c:] = input_mask
        return real

    def _sees(self, keys: torch.Tensor, real: torch.Tensor | None, c: int) -> torch.Tensor:
        """``(b, h, t or 1)``: whether each query sees one of ``keys`` ``(b, h, c + t)`` (bool): a
        real one of the prefix, or one of the sequence (:func:`reach_of`)."""
        real = None if real is None else real[:, None]
        prefix = keys[..., :c] if real is None else keys[..., :c] & real[..., :c]
        seq = reach_of(keys[..., c:], None if real is None else real[..., c:], self.causal)
        return prefix.any(-1, keepdim=True) | seq

    def _mask(self, real: torch.Tensor, t: int, c: int) -> torch.Tensor:
        """Which keys each query may see: ``(b, 1, t, c + t)`` bool, from the ``real`` keys ``(b, c + t)``."""
        b, device = real.shape[0], real.device
        mask = real[:, None, :].expand(b, t, c + t).clone()  # (b, t, c + t)
        own = torch.arange(t, device=device)
        if self.causal:  # the extra keys come before every position
            mask[:, :, c:] &= own[:, None] >= own[None, :]
        mask[:, own, c + own] = True  # a query with nothing else to see attends to itself
        return mask[:, None]
