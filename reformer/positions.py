"""Position encodings: axial (default, as in the paper and trax), fixed sinusoidal, learned
absolute, and rotary (applied to the shared query/key vectors inside attention)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .checks import check_int


class AxialPositionalEmbedding(nn.Module):
    """Axial embedding: position ``p`` is split mixed-radix over ``shape`` (first axis most
    significant) and the per-axis embeddings (widths ``dims``, summing to ``dim``) are
    concatenated. ``prod(shape) * ...`` positions from ``sum(shape_i * dim_i)`` parameters.
    Works for any length up to ``prod(shape)``."""

    def __init__(self, dim: int, shape: tuple[int, ...], dims: tuple[int, ...] | None = None):
        super().__init__()
        shape = tuple(shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"axial_position_shape must be a tuple of ints >= 1, got {shape!r}")
        if dims is None:
            dims = tuple(dim // len(shape) + (i < dim % len(shape)) for i in range(len(shape)))
        dims = tuple(dims)
        if len(dims) != len(shape) or sum(dims) != dim or min(dims) < 1:
            raise ValueError(f"axial dims {dims} must be {len(shape)} ints >= 1 summing to dim={dim}")
        self.shape, self.dims = shape, dims
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(s, d) * 0.02) for s, d in zip(shape, dims, strict=True)]
        )

    @property
    def max_len(self) -> int:
        return math.prod(self.shape)

    def forward(self, length: int, device: torch.device | None = None, offset: int = 0) -> torch.Tensor:
        """``(length, dim)`` embeddings of positions ``offset .. offset+length-1``."""
        if offset + length > self.max_len:
            raise ValueError(f"sequence length {offset + length} exceeds the axial shape's {self.max_len} positions")
        pos = torch.arange(offset, offset + length, device=device or self.weights[0].device)
        parts = []
        stride = self.max_len
        for size, weight in zip(self.shape, self.weights, strict=True):
            stride //= size
            parts.append(weight[(pos // stride) % size])
        return torch.cat(parts, dim=-1)


class FixedPositionalEmbedding(nn.Module):
    """Sinusoidal positions (Vaswani et al. 2017); no parameters."""

    def __init__(self, dim: int):
        super().__init__()
        check_int("dim", dim, 1)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dim = dim

    def forward(self, length: int, device: torch.device | None = None, offset: int = 0) -> torch.Tensor:
        pos = torch.arange(offset, offset + length, device=device or self.inv_freq.device).float()
        angles = pos[:, None] * self.inv_freq[None, :]  # (len, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, : self.dim]


class AbsolutePositionalEmbedding(nn.Module):
    """Learned embedding per absolute position."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, length: int, device: torch.device | None = None, offset: int = 0) -> torch.Tensor:
        return self.emb(torch.arange(offset, offset + length, device=device or self.emb.weight.device))


def rotary_angles(length: int, dim: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """``(length, dim/2)`` rotation angles of positions ``offset .. offset+length-1``."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    pos = torch.arange(offset, offset + length, device=device).float()
    return pos[:, None] * inv_freq[None, :]


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` of ``x`` ``(..., len, d)`` by ``angles`` ``(len, d/2)``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
