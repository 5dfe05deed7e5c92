"""Strict causality in training: with every dropout on and a fixed seed, outputs at positions
<= t never depend on tokens after t (attention dropout is drawn per (query, key) position, not
in the bucket-sorted layout), reversible == plain gradients with dropout, and the dropout masks
keep about 1 - p of the entries, scaled by 1 / (1 - p)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from reformer import Reformer, ReformerEncDec, ReformerLM
from reformer.attention.chunked import lsh_attention_chunked
from reformer.attention.common import dropout_keep
from reformer.attention.full import full_qk_attention
from reformer.attention.local import BlockLocalAttention, local_attention_chunked
from reformer.attention.options import LSHOptions

FLOATS = (torch.float32, torch.float64)
DROPOUTS = dict(lsh_dropout=0.3, post_attn_dropout=0.2, ff_dropout=0.2, layer_dropout=0.2)

LAYOUTS = {
    "lsh": dict(n_hashes=2),
    "lsh-one-round-memory": dict(n_hashes=1, num_mem_kv=2, rotary_emb=True),
    "local-heads": dict(n_hashes=2, n_local_attn_heads=1),
    "local-lsh-full": dict(n_hashes=2, attn_layers=("local", "lsh", "full")),
    "full": dict(use_full_attn=True),
    "dense-sdpa": dict(attn_layers=("full",), shared_qk=False, axial_position_emb=False, absolute_position_emb=True),
    "standard-residual": dict(n_hashes=2, residual="standard", ff_chunks=3),
}


def _train_forward(model: torch.nn.Module, seed: int, *args) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(*args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length", [23, 32])
def test_training_outputs_never_depend_on_later_tokens(layout, length):
    torch.manual_seed(0)
    model = ReformerLM(
        num_tokens=16, dim=16, depth=3, heads=2, bucket_size=4, max_seq_len=64, causal=True,
        **DROPOUTS, **LAYOUTS[layout],
    ).train()  # fmt: skip
    tokens = torch.randint(0, 16, (2, length))
    with torch.no_grad():
        reference = _train_forward(model, 1, tokens)
        assert not torch.equal(reference, _train_forward(model, 2, tokens))  # dropout is on
        for cut in (1, 5, length // 2, length - 1):
            changed = tokens.clone()
            changed[:, cut:] = (tokens[:, cut:] + torch.randint(1, 16, (2, length - cut))) % 16
            out = _train_forward(model, 1, changed)
            torch.testing.assert_close(out[:, :cut], reference[:, :cut], atol=1e-5, rtol=0)
            assert not torch.allclose(out[:, cut:], reference[:, cut:])


@pytest.mark.parametrize("length", [9, 16])
def test_training_decoder_outputs_never_depend_on_later_target_tokens(length):
    torch.manual_seed(0)
    model = ReformerEncDec(
        dim=16, depth=2, heads=2, bucket_size=4, n_hashes=2, max_seq_len=32, num_tokens=16, **DROPOUTS
    ).train()
    src, tgt = torch.randint(0, 16, (2, 11)), torch.randint(0, 16, (2, length))
    with torch.no_grad():
        reference = _train_forward(model, 1, src, tgt)
        for cut in (1, length // 2, length - 1):
            changed = tgt.clone()
            changed[:, cut:] = (tgt[:, cut:] + 1) % 16
            torch.testing.assert_close(_train_forward(model, 1, src, changed)[:, :cut], reference[:, :cut])


@pytest.mark.parametrize("layout", ["lsh", "local-heads", "local-lsh-full"])
def test_reversible_gradients_equal_plain_gradients_with_every_dropout(layout):
    torch.manual_seed(0)
    model = Reformer(
        dim=16, depth=2, heads=2, bucket_size=4, max_seq_len=64, causal=True, **DROPOUTS, **LAYOUTS[layout]
    ).double()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    grads = []
    for reverse_thres in (0, 10**9):  # reversible, then plain
        model.config.reverse_thres = reverse_thres
        model.zero_grad(set_to_none=True)
        _train_forward(model, 3, x).pow(2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction_is_one_minus_p(p):
    rows, q, k = torch.arange(4)[:, None, None], torch.arange(64)[:, None], torch.arange(64)
    fractions = [dropout_keep(torch.tensor(seed), p, rows, q, k).float().mean().item() for seed in range(8)]
    for f in fractions:  # 16K entries each: standard deviation <= 0.004
        assert abs(f - (1 - p)) < 0.02
    assert len(set(fractions)) == len(fractions)  # each seed its own mask
    first = dropout_keep(torch.tensor(0), p, rows, q, k)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[:, 0], first[:, 1])  # rows, queries differ


def _lsh(qk, v, training, dropout=0.5, **kw):
    buckets = torch.randint(0, 4, (qk.shape[0], 2, qk.shape[1]), generator=torch.Generator().manual_seed(5))
    options = LSHOptions(**{"bucket_size": 4, "causal": True, "lsh_dropout": dropout, **kw})
    return lsh_attention_chunked(qk, v, buckets, options, n_buckets=4, training=training)[0]


ATTENTION = {
    "lsh-strict": _lsh,
    "lsh-classic": lambda qk, v, training: _lsh(qk, v, training, strict_causal=False),
    "lsh-non-causal": lambda qk, v, training: _lsh(qk, v, training, causal=False),
    "local": lambda qk, v, training: local_attention_chunked(
        qk, v, window_size=4, causal=True, dropout=0.5, training=training
    ),
    "full": lambda qk, v, training: full_qk_attention(qk, v, causal=True, dropout=0.5, training=training)[0],
}


@pytest.mark.parametrize("kind", ATTENTION)
def test_attention_dropout_mean_is_the_undropped_output(kind):
    """Averaged over seeds, dropout's output is the output without it (keep 1 - p, scale 1 / (1 - p));
    a single draw differs from it (the mask is not all ones)."""
    attend = ATTENTION[kind]
    gen = torch.Generator().manual_seed(0)
    qk, v = torch.randn(2, 13, 8, generator=gen), torch.randn(2, 13, 8, generator=gen)
    plain = attend(qk, v, False)
    draws = torch.stack([attend(qk, v, True) for _ in range(400)])
    assert (draws[0] - plain).abs().max() > 0.1
    error = (draws.mean(0) - plain).abs()
    assert (error <= 5 * draws.std(0) / len(draws) ** 0.5 + 1e-6).all()  # within 5 standard errors


def test_lsh_dropout_mask_is_the_same_in_the_fp32_kernels_and_the_fp64_path():
    """The fp32 path (C row kernels) and the fp64 path (torch ops) draw the same mask."""
    gen = torch.Generator().manual_seed(1)
    qk, v = torch.randn(3, 19, 8, generator=gen), torch.randn(3, 19, 8, generator=gen)
    for kw in (dict(), dict(strict_causal=False), dict(causal=False)):
        outs = [_train_forward(partial(_lsh, training=True, **kw), 7, qk.to(t), v.to(t)) for t in FLOATS]
        torch.testing.assert_close(outs[0].double(), outs[1], atol=1e-5, rtol=1e-5)


def test_block_local_attention_dropout_is_causal():
    torch.manual_seed(0)
    layer = BlockLocalAttention(dim=8, heads=2, chunk_size=4, causal=True, dropout=0.5).train()
    x = torch.randn(1, 14, 8)
    with torch.no_grad():
        reference = _train_forward(layer, 1, x)
        changed = x.clone()
        changed[:, 6:] = torch.randn(1, 8, 8)
        torch.testing.assert_close(_train_forward(layer, 1, changed)[:, :6], reference[:, :6])
        assert not torch.equal(reference, _train_forward(layer, 2, x))
