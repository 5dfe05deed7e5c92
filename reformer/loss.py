"""Next-token cross-entropy that never holds the whole (tokens x vocabulary) logits.

At 1M tokens a byte model's fp32 logits, their softmax and its gradient take about 3 GB, and a
32K vocabulary at 64K tokens 8.6 GB each: more than the rest of a Reformer step. The paper
chunks the output log-probabilities too. Here the head runs on a chunk of positions at a time
under activation checkpointing: a chunk's logits exist while its loss is computed, and again
while its gradient is, never all at once. The price is one more head forward per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGITS_PER_CHUNK = 2**24  # 64 MB of fp32 logits per chunk (plus as much for their gradient): chunks of
# fewer rows make the weight-gradient products too thin to run at speed


def default_chunk_size(num_classes: int) -> int:
    """Positions per chunk so that a chunk holds about :data:`LOGITS_PER_CHUNK` logits."""
    return max(1, LOGITS_PER_CHUNK // num_classes)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy (nats) of ``head(hidden)`` against ``targets``, in fp32, over the
    targets that are not ``ignore_index``; equal to ``F.cross_entropy`` on the full logits.

    ``hidden`` ``(b, n, d)``; ``head`` maps ``(m, d)`` to logits ``(m, vocab)``, row by row;
    ``targets`` ``(b, n)``; ``chunk_size`` positions of the flattened ``b * n`` per chunk."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"loss_chunk_size must be an integer >= 1, got {chunk_size!r}")
    rows = hidden.reshape(-1, hidden.shape[-1])  # (b*n, d)
    labels = targets.reshape(-1).long()  # (b*n,)
    # One chunk holds the whole logits anyway: recomputing it would save nothing (and the first
    # checkpoint() of a process imports torch._dynamo, seconds on a small CPU).
    recompute = torch.is_grad_enabled() and rows.shape[0] > chunk_size
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        chunk, chunk_labels = rows[start : start + chunk_size], labels[start : start + chunk_size]
        if recompute:
            total = total + checkpoint(_summed_loss, head, chunk, chunk_labels, ignore_index, use_reentrant=False)
        else:
            total = total + _summed_loss(head, chunk, chunk_labels, ignore_index)
    return total / (labels != ignore_index).sum()


def _summed_loss(head, rows: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = head(rows).float()  # (m, vocab)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
