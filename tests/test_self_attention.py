"""LSHSelfAttention (projections, heads, memory, keys=, local heads) and local attention."""

import pytest
import torch

from reformer import LSHSelfAttention
from reformer.attention.local import BlockLocalAttention, local_attention_chunked
from reformer.attention.reference import (
    full_qk_attention_reference,
    local_attention_reference,
    lsh_attention_reference,
)
from reformer.hashing import total_buckets


def _reference_forward(layer, x, keys=None, input_mask=None, context_mask=None):
    """The layer's forward rebuilt from its weights and the dense references (eval mode)."""
    b, t, _ = x.shape
    prefix = []
    if layer.mem_kv is not None:
        prefix.append(layer.mem_kv.expand(b, -1, -1))
    if keys is not None:
        prefix.append(keys)
    seq = torch.cat([*prefix, x], dim=1)
    p = seq.shape[1] - t
    mask = torch.ones(b, seq.shape[1], dtype=torch.bool)
    if context_mask is not None:
        mask[:, p - keys.shape[1] : p] = context_mask
    if input_mask is not None:
        mask[:, p:] = input_mask
    h, dh, lh = layer.heads, layer.dim_head, layer.n_local_attn_heads
    qk = layer.toqk(seq).view(b, -1, h, dh).transpose(1, 2)
    v = layer.tov(seq).view(b, -1, h, dh).transpose(1, 2)
    heads = []
    for i in range(h):
        if i < lh:
            heads.append(
                local_attention_reference(
                    qk[:, i, p:],
                    v[:, i, p:],
                    window_size=2 * layer.lsh_attn.bucket_size,
                    causal=layer.causal,
                    look_forward=0 if layer.causal else 1,
                    key_mask=input_mask,
                )
            )
            continue
        if layer.use_full_attn or seq.shape[1] <= layer.full_attn_thres:
            out = full_qk_attention_reference(qk[:, i], v[:, i], causal=layer.causal, key_mask=mask)
        else:
            lsh = layer.lsh_attn
            rows_qk = qk[:, lh:].reshape(-1, seq.shape[1], dh)
            buckets = lsh.hash(rows_qk).view(b, h - lh, lsh.n_hashes, -1)[:, i - lh]
            n_buckets = total_buckets(lsh.bucket_spec(seq.shape[1]))
            out, _ = lsh_attention_reference(
                qk[:, i], v[:, i], buckets, lsh.options, n_buckets=n_buckets, key_mask=mask
            )
        heads.append(out[:, p:])
    out = torch.stack(heads, dim=1).transpose(1, 2).reshape(b, t, h * dh)
    return layer.to_out(out)


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "classic-causal": dict(causal=True, strict_causal=False),
    "mem-kv": dict(num_mem_kv=5),
    "mem-kv-causal": dict(num_mem_kv=3, causal=True),
    "local-heads": dict(n_local_attn_heads=2),
    "local-heads-causal": dict(n_local_attn_heads=1, causal=True),
    "no-dup": dict(allow_duplicate_attention=False, causal=True),
    "per-head-rotations": dict(random_rotations_per_head=True),
    "attn-chunks": dict(attn_chunks=3),
    "factorised": dict(n_buckets=(2, 4)),
    "full": dict(use_full_attn=True, causal=True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_keys", [False, True])
def test_layer_equals_reference(name, with_keys):
    kw = CASES[name]
    layer = LSHSelfAttention(dim=32, heads=4, bucket_size=8, n_hashes=2, **kw).eval()
    x = torch.randn(2, 43, 32)
    input_mask = torch.rand(2, 43) > 0.2
    keys = torch.randn(2, 7, 32) if with_keys else None
    context_mask = torch.rand(2, 7) > 0.3 if with_keys else None
    with torch.no_grad():
        out = layer(x, keys=keys, input_mask=input_mask, context_mask=context_mask)
        ref = _reference_forward(layer, x, keys, input_mask, context_mask)
    assert out.shape == (2, 43, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_short_inputs_use_full_attention_below_threshold():
    layer = LSHSelfAttention(dim=16, heads=2, bucket_size=8, n_hashes=2).eval()
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference_forward(layer, x), atol=1e-5, rtol=0)
    assert layer.full_attn_thres == 8


@pytest.mark.parametrize("n_local", [0, 2])
def test_layer_is_strictly_causal(n_local):
    layer = LSHSelfAttention(
        dim=32,
        heads=4,
        bucket_size=8,
        n_hashes=4,
        causal=True,
        num_mem_kv=2,
        n_local_attn_heads=n_local,
        max_seq_len=128,
    ).eval()
    x = torch.randn(2, 100, 32)
    keys = torch.randn(2, 5, 32)
    with torch.no_grad():
        base = layer(x, keys=keys)
        for i in (0, 17, 63, 98):
            x2 = x.clone()
            x2[:, i + 1 :] = torch.randn_like(x2[:, i + 1 :])
            assert (layer(x2, keys=keys)[:, : i + 1] - base[:, : i + 1]).abs().max() <= 1e-6
            torch.testing.assert_close(
                layer(x[:, : i + 20], keys=keys)[:, : i + 1], base[:, : i + 1], atol=1e-6, rtol=0
            )


def test_gradients_flow_to_every_parameter():
    layer = LSHSelfAttention(dim=16, heads=2, bucket_size=4, n_hashes=2, num_mem_kv=2, n_local_attn_heads=1)
    layer(torch.randn(2, 30, 16)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,window", [(20, 4), (23, 5), (3, 8)])
def test_local_attention_equals_reference(causal, length, window):
    qk, v = torch.randn(2, length, 8), torch.randn(2, length, 6)
    mask = torch.rand(2, length) > 0.2
    for look_forward in (0, 1):
        out = local_attention_chunked(
            qk, v, window_size=window, causal=causal, look_forward=look_forward, key_mask=mask
        )
        ref = local_attention_reference(
            qk, v, window_size=window, causal=causal, look_forward=look_forward, key_mask=mask
        )
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_bad_layer_inputs():
    with pytest.raises(ValueError, match="divisible"):
        LSHSelfAttention(dim=30, heads=4)
    with pytest.raises(ValueError, match="n_local_attn_heads"):
        LSHSelfAttention(dim=32, heads=4, n_local_attn_heads=5)
    with pytest.raises(ValueError, match="attn_chunks"):
        LSHSelfAttention(dim=32, heads=4, attn_chunks=0)
    layer = LSHSelfAttention(dim=32, heads=4, bucket_size=8)
    x = torch.randn(2, 20, 32)
    for kwargs, match in [
        (dict(x=torch.randn(2, 20, 31)), r"x must have shape \(batch, len, 32\)"),
        (dict(x=torch.randn(20, 32)), "x must have shape"),
        (dict(x=torch.ones(2, 20, 32, dtype=torch.long)), "floating-point"),
        (dict(x=x, input_mask=torch.ones(2, 19, dtype=torch.bool)), "input_mask"),
        (dict(x=x, keys=torch.randn(2, 5, 16)), "keys must have shape"),
        (dict(x=x, keys=torch.randn(3, 5, 32)), "keys must have shape"),
        (dict(x=x, context_mask=torch.ones(2, 5, dtype=torch.bool)), "without keys"),
        (dict(x=x, keys=torch.randn(2, 5, 32), context_mask=torch.ones(2, 4, dtype=torch.bool)), "context_mask"),
    ]:
        with pytest.raises(ValueError, match=match):
            layer(**kwargs)


def test_seed_readme_self_attention_example():
    attn = LSHSelfAttention(dim=128, heads=8, bucket_size=64, n_hashes=8, causal=False)
    x = torch.randn(10, 1024, 128)
    assert attn(x).shape == (10, 1024, 128)


@pytest.mark.parametrize("causal", [False, True])
def test_block_local_attention_is_dense_attention_within_its_window(causal):
    """One block (len <= chunk_size) is plain dense attention with separate q/k/v; with blocks,
    a query sees exactly its block and the previous one (the first wraps to the last)."""
    torch.manual_seed(0)
    layer = BlockLocalAttention(16, heads=2, chunk_size=4, causal=causal).eval()
    x = torch.randn(2, 12, 16)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 2:5] = False

    def dense(n: int, visible: torch.Tensor) -> torch.Tensor:  # visible: (n, n) query x key
        q, k, v = (proj(x[:, :n]).view(2, n, 2, 8).transpose(1, 2) for proj in (layer.to_q, layer.to_k, layer.to_v))
        dots = q @ k.transpose(-1, -2) / 8**0.5
        hidden = ~visible | ~mask[:, None, None, :n]
        if causal:
            hidden = hidden | torch.ones(n, n, dtype=torch.bool).triu(1)
        out = dots.masked_fill(hidden, float("-inf")).softmax(-1) @ v
        return layer.to_out(out.transpose(1, 2).reshape(2, n, 16))

    with torch.no_grad():
        short = layer(x[:, :3], input_mask=mask[:, :3])
        torch.testing.assert_close(short, dense(3, torch.ones(3, 3, dtype=torch.bool)))
        block = torch.arange(12) // 4
        visible = (block[:, None] == block[None, :]) | ((block[:, None] - 1) % 3 == block[None, :])
        torch.testing.assert_close(layer(x, input_mask=mask), dense(12, visible))
