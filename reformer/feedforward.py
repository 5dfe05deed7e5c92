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

from .checks import check_int, check_prob

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def check_activation(spec: object) -> str | type[nn.Module]:
    """``ff_activation`` in its stored form: a name of :data:`ACTIVATIONS`, or the name of a
    ``torch.nn`` module class (``nn.LeakyReLU`` -> ``"LeakyReLU"``, so configs stay JSON); another
    ``nn.Module`` subclass is kept as the class (such a model cannot be saved). None is ``"gelu"``
    (``reformer_pytorch``'s default)."""
    if spec is None:
        return "gelu"
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec.__name__ if getattr(nn, spec.__name__, None) is spec else spec
    if isinstance(spec, str) and (spec in ACTIVATIONS or _nn_class(spec) is not None):
        return spec
    raise ValueError(
        f"ff_activation must be one of {sorted(ACTIVATIONS)}, a torch.nn module class (e.g. nn.LeakyReLU) "
        f"or its name, got {spec!r}"
    )


def _nn_class(name: str) -> type[nn.Module] | None:
    cls = getattr(nn, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def make_activation(spec: object) -> nn.Module | object:
    """The activation of ``spec`` (see :func:`check_activation`): a function, or a module
    instance built with no arguments, as ``reformer_pytorch`` does with a class."""
    spec = check_activation(spec)
    if isinstance(spec, str):
        return ACTIVATIONS[spec] if spec in ACTIVATIONS else _nn_class(spec)()
    return spec()


class FeedForward(nn.Module):
    """``Linear(dim, dim*mult) -> activation [-> GLU gate] -> dropout -> Linear(dim*mult, dim)``."""

    def __init__(
        self,
        dim: int,
        mult: int = 4,
        dropout: float = 0.0,
        activation: str | type[nn.Module] = "gelu",
        glu: bool = False,
        chunks: int = 1,
    ):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("ff_mult", mult, 1)
        self.act = make_activation(activation)
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
