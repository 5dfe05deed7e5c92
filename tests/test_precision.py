"""Low precision: mask constants per dtype, bf16/fp16 autocast at 16K tokens with large inputs,
fp16 LSH attention close to fp32, bf16 training close to fp32 (slow)."""

import pytest
import torch

from reformer import LSHSelfAttention, ReformerLM
from reformer.attention.chunked import lsh_attention_chunked
from reformer.attention.common import SELF_ATTN_VALUE, fill_masked_, masked_value
from reformer.attention.options import LSHOptions

LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
def test_mask_constants_fit_the_dtype(dtype):
    hidden_value = masked_value(dtype)
    assert torch.isfinite(torch.tensor(hidden_value, dtype=dtype)) and hidden_value < SELF_ATTN_VALUE
    assert -6e4 < torch.tensor(SELF_ATTN_VALUE, dtype=dtype).item() < -4e4  # finite, and below any real logit
    dots = torch.randn(2, 5, dtype=dtype) * 1e3
    hidden = torch.tensor([[True] * 5, [False, True, True, True, True]])
    is_self = torch.tensor([[False, False, True, False, False]] * 2)
    probs = torch.softmax(fill_masked_(dots, hidden, is_self).float(), dim=-1)
    assert torch.isfinite(probs).all()
    assert probs[0, 2] == 1  # only itself visible: attends to itself
    assert probs[1, 0] == 1  # any other visible key beats the self logit


@pytest.mark.parametrize("dtype", LOW)
def test_autocast_forward_and_backward_stay_finite_at_16k_with_large_inputs(dtype):
    layer = LSHSelfAttention(dim=64, heads=4, bucket_size=64, n_hashes=4, causal=True, max_seq_len=16384)
    x = (torch.randn(1, 16384, 64) * 1000).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_lsh_error_is_that_of_plain_dense_attention(dtype):
    """Chunked LSH in bf16/fp16 vs fp32 errs no more than 2x a plain dense bf16/fp16 attention
    (one chunk covering the sequence, so both compute the same function)."""
    qk, v = torch.randn(4, 64, 32), torch.randn(4, 64, 32)
    buckets = torch.zeros(4, 1, 64, dtype=torch.long)
    exact, _ = lsh_attention_chunked(qk, v, buckets, LSHOptions(bucket_size=64), n_buckets=2)

    def dense(q, k, vals):  # textbook attention with the same shared-QK logits (non-causal)
        keys = k / k.norm(dim=-1, keepdim=True)
        logits = (q @ keys.transpose(1, 2)) * q.shape[-1] ** -0.5
        logits = logits.masked_fill(torch.eye(64, dtype=torch.bool), SELF_ATTN_VALUE)
        return torch.softmax(logits, dim=-1) @ vals

    low, _ = lsh_attention_chunked(qk.to(dtype), v.to(dtype), buckets, LSHOptions(bucket_size=64), n_buckets=2)
    ours = (low.float() - exact).abs().max()
    plain = (dense(qk.to(dtype), qk.to(dtype), v.to(dtype)).float() - exact).abs().max()
    assert ours <= 2 * plain, (ours, plain)


@pytest.mark.parametrize("dtype", LOW)
def test_model_training_step_in_autocast_is_finite(dtype):
    model = ReformerLM(
        num_tokens=64, dim=64, depth=2, heads=4, bucket_size=32, n_hashes=2, max_seq_len=4096, causal=True
    )
    tokens = torch.randint(0, 64, (1, 4096))
    with torch.autocast("cpu", dtype=dtype):
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), tokens)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_bf16_training_ends_within_two_percent_of_fp32(tmp_path):
    """200 steps of the tiny preset on the built-in corpus, fp32 vs bf16 autocast, same seed."""
    from reformer.data import load_corpus
    from reformer.presets import PRESETS
    from reformer.train import TrainConfig, train

    corpus = load_corpus("builtin")
    final = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = ReformerLM(config=PRESETS["tiny"](max_seq_len=256))
        cfg = TrainConfig(steps=200, batch_size=4, seq_len=256, lr=2e-3, warmup_steps=20, eval_every=200,
                          eval_batches=8, save_every=1000, precision=precision)  # fmt: skip
        history = train(model, corpus.train, corpus.valid, cfg, tmp_path / precision).history
        final[precision] = (sum(r["loss"] for r in history[-20:]) / 20, history[-1]["eval_loss"])
    print(f"final train loss (mean of last 20) / eval loss: {final}")
    for fp32, bf16 in zip(final["fp32"], final["bf16"], strict=True):
        assert abs(bf16 - fp32) <= 0.02 * fp32, final
