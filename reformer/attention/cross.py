"""Cross-attention from decoder positions to every encoder output (dense, chunked over
queries so that at most ``query_chunk x context_len`` scores exist at once)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_features, check_int, check_mask, check_prob, resolve_dim_head


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` ``(b, t, dim)`` over ``context`` ``(b, n, dim)``."""

    def __init__(
        self, dim: int, heads: int = 8, dim_head: int | None = None, query_chunk: int = 1024, dropout: float = 0.0
    ):
        super().__init__()
        dim_head = resolve_dim_head(dim, heads, dim_head)
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.query_chunk = check_int("query_chunk", query_chunk, 1)
        self.dropout = check_prob("dropout", dropout)
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_features("context", context, self.dim)
        b, t, _ = x.shape
        n = context.shape[1]
        if context.shape[0] != b:
            raise ValueError(f"context batch ({context.shape[0]}) must match the input batch ({b})")
        check_mask("context_mask", context_mask, (b, n))
        if context_mask is not None and not bool(context_mask.any(dim=1).all()):
            raise ValueError("context_mask must keep at least one context position in every batch row")
        h, dh = self.heads, self.dim_head
        q = self.to_q(x).view(b, t, h, dh).transpose(1, 2)  # (b, h, t, dh)
        k, v = self.to_kv(context).view(b, n, 2, h, dh).permute(2, 0, 3, 1, 4)  # 2 x (b, h, n, dh)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        drop = self.dropout if self.training else 0.0
        out = torch.cat(
            [
                F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, dropout_p=drop)
                for qc in q.split(self.query_chunk, 2)
            ],
            dim=2,
        )
        return self.to_out(out.transpose(1, 2).reshape(b, t, h * dh))
