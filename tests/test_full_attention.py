"""Dense shared-QK attention: the fused path (``scaled_dot_product_attention``) against the
weights path and the reference, outputs and gradients, in the layer and with dropout."""

import pytest
import torch

from reformer.attention import LSHSelfAttention
from reformer.attention.full import full_qk_attention, full_qk_attention_sdpa
from reformer.attention.reference import full_qk_attention_reference


def _inputs(batch, length, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(batch, length, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, length, d, generator=g, dtype=dtype, requires_grad=True)
    return qk, v


def _mask(batch, length, seed=1):
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0] = False  # a row with no key at all: every query attends to itself
    mask[-1, :3] = False  # leading padding: causal queries 0..2 see nothing but themselves
    return mask


def _grads(out, qk, v):
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss that weighs every output
    return torch.autograd.grad((out * weights).sum(), (qk, v), materialize_grads=True)  # len 1: qk unused


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("length", [1, 2, 17, 64])
def test_fused_path_equals_weights_path_and_reference(causal, masked, length):
    qk, v = _inputs(3, length)
    mask = _mask(3, length) if masked else None
    fused, no_weights = full_qk_attention(qk, v, causal=causal, key_mask=mask, need_weights=False)
    dense, weights = full_qk_attention(qk, v, causal=causal, key_mask=mask)
    assert no_weights is None and weights.shape == (3, length, length)
    torch.testing.assert_close(fused, dense, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused, full_qk_attention_reference(qk, v, causal=causal, key_mask=mask),
                               atol=1e-6, rtol=1e-5)  # fmt: skip
    for a, b in zip(_grads(fused, qk, v), _grads(dense, qk, v), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_path_gradcheck_float64(causal):
    qk, v = _inputs(2, 5, d=3, dtype=torch.float64)
    mask = _mask(2, 5)
    for key_mask in (None, mask):
        assert torch.autograd.gradcheck(
            lambda a, b, m=key_mask: full_qk_attention_sdpa(a, b, causal=causal, key_mask=m), (qk, v)
        )


def test_a_query_sees_itself_only_when_nothing_else_is_visible():
    qk, v = _inputs(1, 6)
    out = full_qk_attention_sdpa(qk, v, causal=True)
    torch.testing.assert_close(out[0, 0], v[0, 0])  # position 0 has no earlier key
    # position 1 sees only position 0 (its own key is masked while another is visible)
    torch.testing.assert_close(out[0, 1], v[0, 0])
    mask = torch.zeros(1, 6, dtype=torch.bool)
    torch.testing.assert_close(full_qk_attention_sdpa(qk, v, key_mask=mask), v)  # nothing visible at all


@pytest.mark.parametrize("causal", [False, True])
def test_layer_uses_the_fused_path_unless_weights_or_dropout_are_needed(causal, monkeypatch):
    torch.manual_seed(0)
    layer = LSHSelfAttention(dim=16, heads=2, bucket_size=4, use_full_attn=True, causal=causal)
    x = torch.randn(2, 13, 16)
    calls = []
    import reformer.attention.full as full

    original = full.full_qk_attention_sdpa
    monkeypatch.setattr(full, "full_qk_attention_sdpa", lambda *a, **k: calls.append(1) or original(*a, **k))
    fused = layer(x)
    assert calls == [1]
    seen = []
    layer.callback = lambda attn, buckets: seen.append(attn)  # a Recorder needs the weights
    torch.testing.assert_close(layer(x), fused, atol=1e-6, rtol=1e-5)
    assert calls == [1] and seen[0].shape == (2, 2, 13, 13)
    layer.callback = None
    dropped = LSHSelfAttention(dim=16, heads=2, bucket_size=4, use_full_attn=True, causal=causal, dropout=0.5)
    dropped.load_state_dict(layer.state_dict())
    dropped.train()
    torch.manual_seed(1)
    out = dropped(x)
    assert calls == [1]  # dropout on the weights: the explicit path, which draws the mask
    assert not torch.allclose(out, fused)
    dropped.eval()
    torch.testing.assert_close(dropped(x), fused, atol=1e-6, rtol=1e-5)  # no dropout in eval: fused again
    assert calls == [1, 1]
