"""Task models beyond language modelling, on the shared :class:`~reformer.model.TokenModel`:
sequence classification and masked language modelling, with the layouts of Hugging Face's
``ReformerForSequenceClassification`` / ``ReformerForMaskedLM`` (see :mod:`reformer.convert`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ReformerConfig
from .model import ReformerLM, TokenModel


def pool(hidden: torch.Tensor, input_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """One vector per sequence: ``hidden`` ``(b, n, d)`` -> ``(b, d)``; ``input_mask`` ``(b, n)``
    (True = real token) keeps padding out of ``"last"``, ``"mean"`` and ``"max"``. ``"first"``
    is position 0 whatever the mask (Hugging Face's choice; pad on the right)."""
    if how == "first":
        return hidden[:, 0]
    b, n, _ = hidden.shape
    mask = torch.ones(b, n, dtype=torch.bool, device=hidden.device) if input_mask is None else input_mask
    if how == "last":
        positions = torch.arange(n, device=hidden.device).expand(b, n)
        last = torch.where(mask, positions, 0).amax(dim=1)  # (b,): the last real position (0 if none)
        return hidden[torch.arange(b, device=hidden.device), last]
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (b, n, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    return hidden.masked_fill(~mask.unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(dim=1)


class ClassificationHead(nn.Module):
    """Pooled states ``(b, in_dim)`` -> class logits: dropout, dense, tanh, dropout, projection
    (Hugging Face's ``ReformerClassificationHead``)."""

    def __init__(self, in_dim: int, dim: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(dim, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(x)))))


class ReformerForSequenceClassification(TokenModel):
    """Token ids ``(batch, len)`` -> class logits ``(batch, num_labels)``, or with ``labels``
    ``(batch,)`` the mean cross-entropy. ``config.pooling`` chooses the sequence's vector
    (``"first"``, ``"last"``, ``"mean"``, ``"max"``; padding-aware through ``input_mask``)."""

    def __init__(self, config: ReformerConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg = self.config
        self.classifier = ClassificationHead(self.out_dim, cfg.dim, cfg.num_labels, cfg.classifier_dropout)

    def forward(
        self, x: torch.Tensor, input_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.hidden(x, input_mask=input_mask)  # (b, n, out_dim)
        logits = self.classifier(pool(hidden, input_mask, self.config.pooling))  # (b, num_labels)
        if labels is None:
            return logits
        if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],) or labels.dtype.is_floating_point:
            got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be integer class ids of shape ({x.shape[0]},), got {got}")
        return F.cross_entropy(logits.float(), labels.long())


class ReformerForMaskedLM(ReformerLM):
    """A bidirectional ``ReformerLM`` trained to fill in masked tokens: ``model(x)`` gives the
    logits ``(b, n, num_tokens)`` at every position, ``model(x, labels=y)`` the mean
    cross-entropy over the positions where ``y`` is not ``-100`` (see :func:`mask_tokens`)."""

    def __init__(self, config: ReformerConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        if self.config.causal:
            raise ValueError("ReformerForMaskedLM sees both sides of a position: it needs causal=False")

    def forward(self, x: torch.Tensor, input_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:  # fmt: skip
        return super().forward(x, input_mask=input_mask, targets=labels, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise TypeError("a masked language model does not generate left to right; use a causal ReformerLM")

    stream = generate


def mask_tokens(
    tokens: torch.Tensor,
    mask_token: int,
    num_tokens: int,
    p: float = 0.15,
    generator: torch.Generator | None = None,
    input_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: each real token is chosen with probability ``p``; of those, 80 % become
    ``mask_token``, 10 % a random token, 10 % stay. Returns ``(inputs, labels)``, both ``(b, n)``;
    labels are the original tokens where chosen, ``-100`` elsewhere."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not 0 <= mask_token < num_tokens:
        raise ValueError(f"mask_token must be in [0, num_tokens={num_tokens}), got {mask_token}")
    draw = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    action = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    chosen = draw < p if input_mask is None else (draw < p) & input_mask
    random_tokens = torch.randint(num_tokens, tokens.shape, generator=generator, device=tokens.device)
    inputs = torch.where(chosen & (action < 0.8), mask_token, tokens)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    labels = torch.where(chosen, tokens, -100)
    return inputs, labels
