"""Wrappers kept from ``reformer_pytorch``: ``Recorder`` (attention weights and buckets per
layer), ``Autopadder`` (accepts any length; here the layers already do, so it only forwards)
and ``TrainingWrapper`` (next-token loss and sampling)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .attention import LSHSelfAttention
from .generate import filter_logits, generate


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


def top_k(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """``reformer_pytorch``'s filter: ``logits`` ``(b, vocab)`` outside the top ``(1 - thres)``
    fraction of the vocabulary at -inf (for ``TrainingWrapper.generate(filter_logits_fn=)``)."""
    return filter_logits(logits, top_k=_top_k_count(thres, logits.shape[-1]))


def top_p(logits: torch.Tensor, thres: float = 0.9) -> torch.Tensor:
    """``reformer_pytorch``'s nucleus filter: keep the most likely tokens up to probability mass
    ``1 - thres``."""
    return filter_logits(logits, top_p=1 - _check_thres(thres))


def _check_thres(thres: object) -> float:
    if isinstance(thres, bool) or not isinstance(thres, (int, float)) or not 0 <= thres < 1:
        raise ValueError(f"filter_thres must be in [0, 1), got {thres!r}")
    return float(thres)


def _top_k_count(thres: float, vocab: int) -> int:
    return max(1, int((1 - _check_thres(thres)) * vocab))


def batch_sequences(x: torch.Tensor | list[torch.Tensor], pad_value: int) -> torch.Tensor:
    """``x`` as one ``(b, n)`` tensor: a list of 1-D sequences is right-padded with ``pad_value``."""
    if isinstance(x, torch.Tensor):
        return x
    if not isinstance(x, (list, tuple)) or not x or not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in x):
        raise ValueError("sequences must be a (batch, len) tensor or a non-empty list of 1-D token tensors")
    return pad_sequence(list(x), batch_first=True, padding_value=pad_value)


class _Conditioned(nn.Module):
    """A language model with fixed extra forward arguments (``context=``, ``keys=``, ...), as
    :func:`reformer.generate.generate` sees it: ``forward(tokens, cache=)``, ``config``,
    ``check_tokens``, ``cache_unsupported_reason``."""

    def __init__(self, net: nn.Module, **forward_kwargs: Any):
        super().__init__()
        self.net, self.forward_kwargs = net, forward_kwargs

    @property
    def config(self):
        return self.net.config

    def check_tokens(self, tokens: torch.Tensor) -> None:
        self.net.check_tokens(tokens)

    def cache_unsupported_reason(self) -> str | None:
        return self.net.cache_unsupported_reason()

    def forward(self, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.net(tokens, **self.forward_kwargs, **kwargs)


class TrainingWrapper(nn.Module):
    """Drop-in for ``reformer_pytorch.TrainingWrapper``: next-token loss and sampling for a
    ``ReformerLM`` (or an ``Autopadder`` around one); ``generate`` uses cached decoding.

    ``x`` may be a ``(b, n)`` tensor or a list of 1-D token tensors of different lengths, which
    are right-padded with ``pad_value`` (use ``ignore_index=pad_value`` to leave the padding out
    of the loss)."""

    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0):
        super().__init__()
        self.net = net
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.max_seq_len = net.config.max_seq_len

    def forward(self, x: torch.Tensor | list[torch.Tensor], return_loss: bool = False, **kwargs: Any) -> torch.Tensor:
        """Logits, or with ``return_loss`` the mean cross-entropy of predicting each next token."""
        if not return_loss:
            return self.net(batch_sequences(x, self.pad_value), **kwargs)
        if isinstance(x, torch.Tensor):
            inputs, targets = x[:, :-1], x[:, 1:]
        else:  # each sequence shifted on its own, then padded
            inputs = batch_sequences([t[:-1] for t in x], self.pad_value)
            targets = batch_sequences([t[1:] for t in x], self.pad_value)
        if kwargs.get("input_mask") is not None:
            kwargs["input_mask"] = kwargs["input_mask"][:, : inputs.shape[1]]
        # (the model's chunked loss: the (b, n-1, vocab) logits never exist at once)
        return self.net(inputs, targets=targets.masked_fill(targets == self.ignore_index, -100), **kwargs)

    def generate(
        self,
        start_tokens: torch.Tensor,
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn: Callable[..., torch.Tensor] = top_k,
        filter_thres: float = 0.9,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Sample ``seq_len`` tokens after ``start_tokens`` ``(b, n)``, returning ``(b, <= seq_len)``,
        or after ``(n,)``, returning ``(<= seq_len,)``. ``filter_logits_fn``: :func:`top_k` keeps the
        top ``(1 - filter_thres)`` fraction of the vocabulary, :func:`top_p` the smallest set of
        tokens with probability ``1 - filter_thres``. ``input_mask`` (all True: equal-length prompts),
        and arguments of the model's forward (``context=``, ``context_mask=``, ``keys=``) pass on;
        ``use_cache``, ``seed``, ``compile`` as in :meth:`ReformerLM.generate`."""
        one_row = isinstance(start_tokens, torch.Tensor) and start_tokens.dim() == 1
        if one_row:
            start_tokens = start_tokens[None]
        options = {k: kwargs.pop(k) for k in ("use_cache", "seed", "compile") if k in kwargs}
        input_mask = kwargs.pop("input_mask", None)
        if input_mask is not None and not bool(torch.as_tensor(input_mask).all()):
            raise ValueError("generate takes prompts without padding: input_mask must be all True")
        if filter_logits_fn is top_k:
            options["top_k"] = _top_k_count(filter_thres, self.net.config.num_tokens)
        elif filter_logits_fn is top_p:
            options["top_p"] = 1 - _check_thres(filter_thres)
        else:
            raise ValueError("filter_logits_fn must be reformer.generative_tools.top_k or top_p")
        if kwargs.get("keys") is not None:  # extra self-attention keys are not cached
            options.setdefault("use_cache", False)
        net = self.net.net if isinstance(self.net, Autopadder) else self.net
        net = _Conditioned(net, **kwargs) if kwargs else net
        out = generate(net, start_tokens, seq_len, temperature=temperature, eos_token=eos_token, **options)
        return out[0] if one_row else out
