"""Wrappers kept from ``reformer_pytorch``: ``Recorder`` (attention weights and buckets per
layer) and ``Autopadder`` (accepts any length; here the layers already do, so it only checks
and forwards)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from .attention import LSHSelfAttention


class Recorder(nn.Module):
    """Records, per forward call, each LSH layer's attention ``(b, heads, n, n)`` and buckets
    ``(b, heads, n_hashes, n)`` into ``recordings[call_index]`` (a list, one entry per layer)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.recordings: dict[int, list[dict[str, torch.Tensor | None]]] = defaultdict(list)
        self.iter = 0
        self.on = True
        self.ejected = False
        self._wire(True)

    def _layers(self) -> list[LSHSelfAttention]:
        return [m for m in self.net.modules() if isinstance(m, LSHSelfAttention)]

    def _wire(self, on: bool) -> None:
        for layer in self._layers():
            layer.lsh_attn.return_attn = on
            layer.callback = self._record if on else None

    def _record(self, attn: torch.Tensor | None, buckets: torch.Tensor) -> None:
        if self.on:
            self.recordings[self.iter].append(
                {"attn": None if attn is None else attn.detach().cpu(), "buckets": buckets.detach().cpu()}
            )

    def turn_on(self) -> None:
        self.on = True

    def turn_off(self) -> None:
        self.on = False

    def clear(self) -> None:
        self.recordings.clear()
        self.iter = 0

    def eject(self) -> nn.Module:
        """Stop recording for good and return the wrapped model, unchanged."""
        self.ejected = True
        self.clear()
        self._wire(False)
        return self.net

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.ejected:
            raise RuntimeError("this Recorder was ejected; use the model it returned")
        out = self.net(*args, **kwargs)
        self.iter += 1
        return out


class Autopadder(nn.Module):
    """Drop-in for ``reformer_pytorch.Autopadder``. Our attention pads internally to the bucket
    size and masks the padding, so any length up to ``max_seq_len`` works unwrapped; this
    wrapper just forwards the call."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)
