"""Feed-forward chunking and position encodings."""

import pytest
import torch

from reformer.feedforward import FeedForward
from reformer.positions import (
    AbsolutePositionalEmbedding,
    AxialPositionalEmbedding,
    FixedPositionalEmbedding,
    apply_rotary,
    rotary_angles,
)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_chunked_feedforward_equals_unchunked(glu, activation):
    ff = FeedForward(16, mult=3, activation=activation, glu=glu)
    x = torch.randn(2, 37, 16, requires_grad=True)
    out = ff(x)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in ff.parameters()]
    x.grad = None
    ff.zero_grad()
    ff.chunks = 5
    chunked = ff(x)
    chunked.square().sum().backward()
    torch.testing.assert_close(chunked, out, atol=1e-6, rtol=0)
    for a, b in zip(grads, [x.grad] + [p.grad for p in ff.parameters()], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_feedforward_replays_dropout_in_backward():
    ff = FeedForward(8, dropout=0.5, chunks=3).train()
    x = torch.randn(1, 12, 8, requires_grad=True)
    torch.manual_seed(3)
    ff(x).sum().backward()
    g_chunked = x.grad.clone()
    x.grad = None
    ff.chunks = 1
    # The same masks in one piece: draw them chunk by chunk from the same seed.
    torch.manual_seed(3)
    parts = [ff._block(p) for p in x.chunk(3, dim=1)]
    torch.cat(parts, dim=1).sum().backward()
    torch.testing.assert_close(g_chunked, x.grad)


def test_feedforward_rejects_bad_options():
    with pytest.raises(ValueError, match="ff_activation"):
        FeedForward(8, activation="tanh")
    with pytest.raises(ValueError, match="ff_chunks"):
        FeedForward(8, chunks=0)


def test_axial_embedding_is_mixed_radix_concatenation_for_any_length():
    emb = AxialPositionalEmbedding(10, (4, 8), dims=(4, 6))
    full = emb(32)
    assert full.shape == (32, 10)
    for p in (0, 7, 8, 31):
        expected = torch.cat([emb.weights[0][p // 8], emb.weights[1][p % 8]])
        torch.testing.assert_close(full[p], expected)
    torch.testing.assert_close(emb(13), full[:13])
    with pytest.raises(ValueError, match="exceeds"):
        emb(33)
    with pytest.raises(ValueError, match="summing to dim"):
        AxialPositionalEmbedding(10, (4, 8), dims=(4, 5))


def test_fixed_and_absolute_embeddings():
    fixed = FixedPositionalEmbedding(6)(5)
    assert fixed.shape == (5, 6)
    torch.testing.assert_close(fixed[0], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    assert AbsolutePositionalEmbedding(4, 10)(7).shape == (7, 4)


def test_rotary_preserves_norms_and_encodes_relative_offsets():
    x = torch.randn(3, 16, 8)
    angles = rotary_angles(16, 8, x.device)
    rx = apply_rotary(x, angles)
    torch.testing.assert_close(rx.norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(8), torch.randn(8)
    a = rotary_angles(20, 8, x.device)
    dot = lambda i, j: apply_rotary(q[None], a[i : i + 1])[0] @ apply_rotary(k[None], a[j : j + 1])[0]  # noqa: E731
    torch.testing.assert_close(dot(3, 1), dot(13, 11), atol=1e-5, rtol=0)
