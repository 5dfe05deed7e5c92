"""Sampling from a ``ReformerLM``: temperature, top-k and top-p (nucleus) filtering.

Each new token runs the model on the last ``max_seq_len`` tokens (eval mode, so hashing is
deterministic); cached incremental decoding is a planned replacement of that inner call.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` ``(b, vocab)`` with everything outside the top ``k`` / top-``p`` mass at -inf."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def stream(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield ``(b,)`` new tokens one at a time after ``prompt`` ``(b, n)``."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape (batch, len >= 1), got {tuple(prompt.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    generator = torch.Generator(prompt.device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    tokens = prompt
    try:
        for _ in range(max_new_tokens):
            logits = model(tokens[:, -model.config.max_seq_len :])[:, -1].float()  # (b, vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            yield nxt
            if eos_token is not None and bool((nxt == eos_token).all()):
                break
    finally:
        model.train(was_training)


def generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """``(b, <= max_new_tokens)`` sampled continuation of ``prompt``; options as :func:`stream`."""
    new = list(stream(model, prompt, max_new_tokens, **kwargs))
    return torch.stack(new, dim=1) if new else prompt.new_zeros(prompt.shape[0], 0)
