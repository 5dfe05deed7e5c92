"""Position-wise feed-forward, optionally chunked along the sequence.

With ``chunks > 1`` the ``(len, dim * mult)`` hidden activation exists for one chunk at a
time, in the forward *and* in the backward: each chunk runs under activation checkpointing,
so only its input is kept and its hidden layer is recomputed when its gradient is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention.common import check_int, check_prob

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class FeedForward(nn.Module):
    """``Linear(dim, dim*mult) -> activation [-> GLU gate] -> dropout -> Linear(dim*mult, dim)``."""

    def __init__(
        self,
        dim: int,
        mult: int = 4,
        dropout: float = 0.0,
        activation: str = "gelu",
        glu: bool = False,
        chunks: int = 1,
    ):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("ff_mult", mult, 1)
        if activation not in ACTIVATIONS:
            raise ValueError(f"ff_activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.act = ACTIVATIONS[activation]
        self.glu = bool(glu)
        self.chunks = check_int("ff_chunks", chunks, 1)
        hidden = dim * mult
        self.w1 = nn.Linear(dim, hidden * (2 if glu else 1))
        self.dropout = nn.Dropout(check_prob("ff_dropout", dropout))
        self.w2 = nn.Linear(hidden, dim)

    def _block(self, x: torch.Tensor) -> torch.Tensor:  # (b, n, dim) -> (b, n, dim)
        if self.glu:
            h, gate = self.w1(x).chunk(2, dim=-1)
            h = self.act(h) * gate
        else:
            h = self.act(self.w1(x))
        return self.w2(self.dropout(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks == 1 or x.shape[-2] <= 1:
            return self._block(x)
        parts = x.chunk(self.chunks, dim=-2)
        if torch.is_grad_enabled():
            # Checkpoint each chunk: the backward recomputes one chunk's hidden layer at a time
            # (the RNG state is replayed, so dropout masks match the forward).
            return torch.cat([checkpoint(self._block, p, use_reentrant=False) for p in parts], dim=-2)
        return torch.cat([self._block(p) for p in parts], dim=-2)
