"""Product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys").

A feed-forward replacement with ``num_keys ** 2`` learned value slots. Each head splits its
query in two halves; each half scores ``num_keys`` sub-keys, and the best ``topk`` of each
combine into ``topk ** 2`` candidate slots (score = sum of the halves' scores), of which the
best ``topk`` are read, softmax-weighted. Cost per position: ``O(heads * num_keys * dim_head)``,
not ``O(num_keys ** 2)``.

The layout (parameter names and shapes) is that of ``product_key_memory.PKM``, which
``reformer_pytorch`` uses for ``pkm_layers``; its state dict loads here. Queries are
normalised with LayerNorm (that package's default): batch norm would mix positions and so
break causality.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .checks import check_int

#: Slots each memory reads per head (``product_key_memory``'s default, kept by ``reformer_pytorch``).
PKM_TOPK = 32


class PKM(nn.Module):
    """``(b, n, dim)`` -> ``(b, n, dim)``: a product-key memory lookup per position."""

    def __init__(self, dim: int, heads: int = 4, num_keys: int = 128, topk: int = PKM_TOPK, dim_head: int = 128):
        super().__init__()
        self.heads = check_int("heads", heads, 1)
        self.num_keys = check_int("pkm_num_keys", num_keys, 1)
        self.topk = check_int("topk", topk, 1)
        if topk > num_keys:
            raise ValueError(f"topk must be at most pkm_num_keys={num_keys}, got {topk}")
        self.to_queries = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.norm = nn.LayerNorm(dim_head)
        self.keys = nn.Parameter(torch.randn(heads, num_keys, 2, dim_head) / math.sqrt(dim_head))
        self.values = nn.EmbeddingBag(num_keys**2, dim, mode="sum")
        nn.init.normal_(self.values.weight, std=1 / math.sqrt(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, k = self.heads, self.topk
        q = self.norm(self.to_queries(x).view(b, n, 2, h, -1))  # (b, n, half, h, dh)
        scores = torch.einsum("bnphd,hkpd->bnhpk", q, self.keys)  # (b, n, h, half, num_keys)
        top, idx = scores.topk(k, dim=-1)  # (b, n, h, half, k)
        pair_scores = (top[..., 0, :, None] + top[..., 1, None, :]).flatten(-2)  # (b, n, h, k*k)
        pair_slots = (idx[..., 0, :, None] * self.num_keys + idx[..., 1, None, :]).flatten(-2)
        best, best_idx = pair_scores.topk(k, dim=-1)  # (b, n, h, k)
        slots = pair_slots.gather(-1, best_idx)
        weights = best.softmax(dim=-1)
        out = self.values(slots.reshape(b * n, h * k), per_sample_weights=weights.reshape(b * n, h * k))
        return out.view(b, n, -1)
