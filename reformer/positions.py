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

    def forward(self, length: int, device: torch.device | None = None, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """``(length, dim)`` embeddings of positions ``offset .. offset+length-1``."""
        if isinstance(offset, int) and offset + length > self.max_len:  # (a tensor offset: decoding, checked)
            raise ValueError(f"sequence length {offset + length} exceeds the axial shape's {self.max_len} positions")
        pos = torch.arange(length, device=device or self.weights[0].device) + offset
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

    def forward(self, length: int, device: torch.device | None = None, offset: int | torch.Tensor = 0) -> torch.Tensor:
        pos = (torch.arange(length, device=device or self.inv_freq.device) + offset).float()
        angles = pos[:, None] * self.inv_freq[None, :]  # (len, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, : self.dim]


class AbsolutePositionalEmbedding(nn.Module):
    """Learned embedding per absolute position."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, length: int, device: torch.device | None = None, offset: int | torch.Tensor = 0) -> torch.Tensor:
        return self.emb(torch.arange(length, device=device or self.emb.weight.device) + offset)


def rotary_angles(length: int, dim: int, device: torch.device, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """``(length, dim/2)`` rotation angles of positions ``offset .. offset+length-1``."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    pos = (torch.arange(length, device=device) + offset).float()
    return pos[:, None] * inv_freq[None, :]


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` of ``x`` ``(..., len, d)`` by ``angles`` ``(len, d/2)``."""
    return _rotate_pairs(x, angles.cos(), angles.sin())


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` of ``x`` ``(..., len, d)`` by the angles whose cosines and
    sines are ``cos``, ``sin`` ``(len, d/2)``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def rotate_by_pos_emb(x: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
    """``reformer_pytorch``'s ``pos_emb`` on ``x`` ``(..., len, d)``: ``pos_emb`` ``(1, n, d)``
    holds ``[sin | cos]`` halves (its ``FixedPositionalEmbedding(d)``); the first ``n <= len``
    positions are rotated by those angles, the rest pass unchanged."""
    d, length = x.shape[-1], x.shape[-2]
    if not isinstance(pos_emb, torch.Tensor) or pos_emb.dim() != 3 or pos_emb.shape[0] != 1:
        raise ValueError(f"pos_emb must be a (1, n, {d}) tensor, got {getattr(pos_emb, 'shape', type(pos_emb))}")
    n = pos_emb.shape[1]
    if pos_emb.shape[2] != d or d % 2 or n > length:
        raise ValueError(f"pos_emb must be (1, n <= {length}, {d}) with {d} even, got {tuple(pos_emb.shape)}")
    sin, cos = pos_emb[0].chunk(2, dim=-1)  # (n, d/2) each
    turned = _rotate_pairs(x[..., :n, :], cos, sin)
    return torch.cat([turned, x[..., n:, :]], dim=-2) if n < length else turned
