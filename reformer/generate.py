"""Sampling from a ``ReformerLM``: greedy, temperature, top-k and top-p (nucleus).

By default the prompt is run once through the parallel forward (the prefill) and every new
token then goes through the layers alone, attending through a
:class:`~reformer.attention.decode.DecodingCache` - the same logits as a full forward on the
sequence so far, at a cost per token that does not grow with the context for LSH and local
layers. ``use_cache=False`` recomputes the whole context for every token (the reference).

Past ``max_seq_len`` tokens both paths see the same context (:func:`context_start`): it
restarts from the last ``max_seq_len // 2`` tokens and grows again.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from .attention.common import check_int
from .attention.decode import DecodingCache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` ``(b, vocab)`` with everything outside the top ``k`` / top-``p`` mass at -inf."""
    _check_filters(top_k, top_p)
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _check_filters(top_k: int | None, top_p: float | None) -> None:
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def context_start(n_tokens: int, max_seq_len: int) -> int:
    """Index of the first token the model sees when ``n_tokens`` exist: 0 while they fit in
    ``max_seq_len``; after that the context restarts from the last ``max_seq_len // 2`` tokens
    each time it would overflow (so a cache is rebuilt once per ``max_seq_len / 2`` tokens)."""
    keep = max(1, max_seq_len // 2)
    shift = max_seq_len + 1 - keep
    return max(0, (n_tokens - keep) // shift) * shift


def _check_prompt(model: torch.nn.Module, prompt: torch.Tensor) -> None:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] == 0:
        got = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be a (batch, len >= 1) tensor of token ids, got {got}")
    max_len = model.config.max_seq_len
    if prompt.shape[1] > max_len:
        raise ValueError(f"prompt has {prompt.shape[1]} tokens, more than max_seq_len={max_len}")
    model.check_tokens(prompt)


def stream(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    use_cache: bool = True,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ``(b,)`` of every prompt row ``(b, n)``, one step at a time.

    ``temperature`` 0 is greedy. A row that has produced ``eos_token`` keeps producing it; the
    stream ends when every row has. ``seed`` makes sampling reproducible. ``use_cache``
    falls back to recomputing (with a warning) for models whose outputs a cache cannot
    reproduce exactly (not causal, ``strict_causal=False``).
    """
    _check_prompt(model, prompt)
    check_int("max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    _check_filters(top_k, top_p)
    if eos_token is not None and not 0 <= check_int("eos_token", eos_token, 0) < model.config.num_tokens:
        raise ValueError(f"eos_token must be in [0, num_tokens={model.config.num_tokens}), got {eos_token}")
    if use_cache:
        reason = model.cache_unsupported_reason()
        if reason is not None:
            warnings.warn(f"use_cache: recomputing every step instead, because {reason}", stacklevel=2)
            use_cache = False
    return _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, use_cache, seed)


@torch.no_grad()
def _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, use_cache, seed):
    generator = torch.Generator(prompt.device).manual_seed(seed) if seed is not None else None
    max_len = model.config.max_seq_len
    was_training = model.training
    model.eval()
    tokens = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    cache, cache_start = None, 0
    try:
        for _ in range(max_new_tokens):
            start = context_start(tokens.shape[1], max_len)
            if not use_cache:
                logits = model(tokens[:, start:])
            elif cache is None or start != cache_start:  # (re)fill the cache with the context
                cache, cache_start = (
                    DecodingCache(capacity=min(max_len, tokens.shape[1] - start + max_new_tokens)),
                    start,
                )
                logits = model(tokens[:, start:], cache=cache)
            else:
                logits = model(tokens[:, -1:], cache=cache)
            logits = logits[:, -1].float()  # (b, vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            if eos_token is not None:
                nxt = nxt.masked_fill(done, eos_token)
                done |= nxt == eos_token
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            yield nxt
            if bool(done.all()):
                break
    finally:
        model.train(was_training)


def generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
    """``(b, <= max_new_tokens)`` continuation of ``prompt`` ``(b, n)``; options as :func:`stream`."""
    new = list(stream(model, prompt, max_new_tokens, **options))
    return torch.stack(new, dim=1) if new else prompt.new_zeros(prompt.shape[0], 0)
