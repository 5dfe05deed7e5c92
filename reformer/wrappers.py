"""Wrappers kept from ``reformer_pytorch``: ``Recorder`` (attention weights and buckets per
layer), ``Autopadder`` (accepts any length; here the layers already do, so it only forwards)
and ``TrainingWrapper`` (next-token loss and sampling)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
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
    wrapper just forwards the call (and ``generate``, which needs no padding either)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def config(self):
        return self.net.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.net.generate(*args, **kwargs)


class TrainingWrapper(nn.Module):
    """Drop-in for ``reformer_pytorch.TrainingWrapper``: next-token loss and sampling for a
    ``ReformerLM`` (or an ``Autopadder`` around one); ``generate`` uses cached decoding."""

    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0):
        super().__init__()
        self.net = net
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.max_seq_len = net.config.max_seq_len

    def forward(self, x: torch.Tensor, return_loss: bool = False, **kwargs: Any) -> torch.Tensor:
        """Logits, or with ``return_loss`` the mean cross-entropy of predicting ``x[:, 1:]``."""
        if not return_loss:
            return self.net(x, **kwargs)
        if "input_mask" in kwargs and kwargs["input_mask"] is not None:
            kwargs["input_mask"] = kwargs["input_mask"][:, :-1]
        logits = self.net(x[:, :-1], **kwargs)  # (b, n-1, vocab)
        return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], ignore_index=self.ignore_index)

    def generate(
        self,
        start_tokens: torch.Tensor,
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_thres: float = 0.9,
        **options: Any,
    ) -> torch.Tensor:
        """Sample ``seq_len`` tokens after ``start_tokens`` ``(b, n)`` or ``(n,)``, keeping the top
        ``(1 - filter_thres)`` fraction of the vocabulary at each step. Returns ``(b, <= seq_len)``.
        Further ``options`` (``use_cache``, ``seed``, ``top_p``) as in :meth:`ReformerLM.generate`."""
        if isinstance(start_tokens, torch.Tensor) and start_tokens.dim() == 1:
            start_tokens = start_tokens[None]
        if isinstance(filter_thres, bool) or not isinstance(filter_thres, (int, float)) or not 0 <= filter_thres < 1:
            raise ValueError(f"filter_thres must be in [0, 1), got {filter_thres!r}")
        k = max(1, int((1 - filter_thres) * self.net.config.num_tokens))
        return self.net.generate(
            start_tokens, seq_len, temperature=temperature, top_k=k, eos_token=eos_token, **options
        )
