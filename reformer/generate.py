"""Sampling from a ``ReformerLM``: greedy, temperature, top-k and top-p (nucleus).

By default the prompt is run once through the parallel forward (the prefill) and every new
token then goes through the layers alone, attending through a
:class:`~reformer.attention.decode.DecodingCache` - the same logits as a full forward on the
sequence so far, at a cost per token that does not grow with the context for LSH and local
layers. ``use_cache=False`` recomputes the whole context for every token (the reference).

Past ``max_seq_len`` tokens both paths see the same context (:func:`context_start`): it
restarts from the last ``max_seq_len // 2`` tokens and grows again.

Sampling never fails inside torch: a temperature however small, or logits of +-inf, give a
distribution (:func:`sampling_probs`); NaN logits, a bad option or seed are a ValueError.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterator

import torch

from .attention.decode import DecodingCache
from .checks import check_int


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
        drop[:, 0] = False  # and the most likely token, always (a top_p below the dtype's tiny is 0)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """``softmax(logits / temperature)`` ``(b, vocab)`` over the tokens :func:`filter_logits` keeps,
    for any ``temperature > 0`` and any logits but NaN: computed from ``logits - max`` (the same
    distribution), so a tiny temperature cannot overflow. Where exp underflows it is greedy, with
    the tokens that share the largest logit equally likely - those at ``+inf`` if any, all of
    them if every logit is ``-inf``."""
    top = logits.amax(dim=-1, keepdim=True)  # (b, 1)
    # (== top: 0, not inf - inf or -inf - -inf, which are NaN)
    scaled = torch.where(logits == top, 0.0, (logits - top) / temperature)
    return filter_logits(scaled, top_k, top_p).softmax(dim=-1)


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator
) -> torch.Tensor:
    """The next token ``(b,)`` of each row of ``logits`` ``(b, vocab)``: greedy at temperature 0."""
    nan = logits.isnan().any(dim=-1)  # (b,)
    if bool(nan.any()):  # (a sync per token, as the eos check makes: sampling is not the model's hot path)
        rows = nan.nonzero()[:, 0].tolist()
        raise ValueError(f"the model's logits are NaN in batch rows {rows[:8]}: nothing to sample from")
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]


def _check_seed(seed: object) -> int | None:
    """``seed`` as an int in the range ``torch.Generator.manual_seed`` takes, or a ValueError."""
    if seed is None:
        return None
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not -(2**63) <= value < 2**64:
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    return value


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
        raise ValueError(
            f"prompt must be a (batch, len >= 1) tensor of token ids (the model has no start token), got {got}"
        )
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
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token ``(b,)`` of every prompt row ``(b, n)``, one step at a time.

    ``temperature`` 0 is greedy (see :func:`sampling_probs` for tiny ones). A row that has
    produced ``eos_token`` keeps producing it; the stream ends when every row has. ``seed``
    (an int) makes sampling reproducible. ``use_cache`` falls back to recomputing (with a
    warning) for models whose outputs a cache cannot reproduce exactly (not causal,
    ``strict_causal=False``). ``compile`` runs each cached decode step through
    ``torch.compile`` (the first one compiles it, which can take a minute; one graph then
    serves every position). The prompt may have any integer dtype; tokens are int64. An
    empty batch yields nothing.
    """
    _check_prompt(model, prompt)
    check_int("max_new_tokens", max_new_tokens, 0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 <= temperature < float("inf")  # (False for NaN)
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    _check_filters(top_k, top_p)
    seed = _check_seed(seed)
    if eos_token is not None and not 0 <= check_int("eos_token", eos_token, 0) < model.config.num_tokens:
        raise ValueError(f"eos_token must be in [0, num_tokens={model.config.num_tokens}), got {eos_token}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if compile and not use_cache:
        raise ValueError("compile compiles the cached decode step: it needs use_cache=True")
    if use_cache:
        reason = model.cache_unsupported_reason()
        if reason is not None:
            uncompiled = ", uncompiled," if compile else ""
            warnings.warn(f"use_cache: recomputing every step{uncompiled} instead, because {reason}", stacklevel=2)
            use_cache = compile = False
    if prompt.shape[0] == 0:
        max_new_tokens = 0
    return _stream(model, prompt.long(), max_new_tokens, temperature, top_k, top_p, eos_token, use_cache, seed, compile)


@torch.no_grad()
def _stream(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_token, use_cache, seed, compile):
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
                    DecodingCache(capacity=min(max_len, tokens.shape[1] - start + max_new_tokens), compile=compile),
                    start,
                )
                logits = model(tokens[:, start:], cache=cache)
            else:
                logits = model(tokens[:, -1:], cache=cache)
            nxt = _next_tokens(logits[:, -1].float(), temperature, top_k, top_p, generator)  # (b,)
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
    return torch.stack(new, dim=1) if new else torch.zeros(len(prompt), 0, dtype=torch.long, device=prompt.device)
