"""Reformer / ReformerLM: reversible == plain gradients, strict causality, README examples, errors."""

import pytest
import torch

from reformer import Reformer, ReformerLM


def _grads(model, x, seed, reversible, **kwargs):
    model.config.reverse_thres = 0 if reversible else 10**9
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x, **kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in model.parameters()]


REV_CASES = [
    dict(causal=True, n_hashes=4, attn_chunks=1),
    dict(causal=True, n_hashes=1, attn_chunks=4),
    dict(causal=False, n_hashes=4, attn_chunks=4, weight_tie=True),
    dict(causal=False, n_hashes=1, attn_chunks=1, num_mem_kv=3, n_local_attn_heads=1),
    dict(causal=True, n_hashes=2, twin_attention=True, layer_dropout=0.3),
    dict(causal=True, n_hashes=2, attn_layers=("local", "lsh", "full"), ff_chunks=3, ff_glu=True),
]


@pytest.mark.parametrize("case", REV_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_reversible_gradients_equal_plain_gradients_with_dropout(case):
    model = Reformer(
        dim=32,
        depth=3,
        heads=2,
        bucket_size=8,
        max_seq_len=64,
        lsh_dropout=0.1,
        ff_dropout=0.1,
        post_attn_dropout=0.1,
        **case,
    ).train()
    x = torch.randn(2, 50, 32)
    mask = torch.rand(2, 50) > 0.1
    out_rev, g_rev = _grads(model, x, 11, True, input_mask=mask)
    out_plain, g_plain = _grads(model, x, 11, False, input_mask=mask)
    torch.testing.assert_close(out_rev, out_plain, atol=1e-6, rtol=0)
    for a, b in zip(g_rev, g_plain, strict=True):
        if b is None:
            assert a is None
            continue
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-8


def test_reversible_backward_reuses_the_forward_buckets(monkeypatch):
    # Each LSH layer hashes once per training step: the backward's re-run of a reversible block
    # takes the buckets its forward computed (the rotations are still drawn, keeping the RNG in
    # step, so the gradients stay those of the plain network: see the test above).
    import reformer.attention.lsh as lsh

    calls = []
    original = lsh.hash_vectors
    monkeypatch.setattr(lsh, "hash_vectors", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = Reformer(dim=32, depth=3, heads=2, bucket_size=8, max_seq_len=64, lsh_dropout=0.1).train()
    x = torch.randn(2, 50, 32)
    for reversible, hashes in ((True, 3), (False, 3)):
        calls.clear()
        _grads(model, x, 0, reversible)
        assert len(calls) == hashes
    model.eval()
    with torch.no_grad():  # a forward with no backward keeps nothing and hashes as usual
        calls.clear()
        model.config.reverse_thres = 0
        model(x)
        model(x)
        assert len(calls) == 6


def test_reversible_gradients_float64_and_keys_gradient():
    model = Reformer(dim=16, depth=2, heads=2, bucket_size=4, n_hashes=2, max_seq_len=32, causal=True).double()
    x = torch.randn(1, 23, 16, dtype=torch.float64)
    keys = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    _, g_rev = _grads(model, x, 0, True, keys=keys)
    k_rev, keys.grad = keys.grad.clone(), None
    _, g_plain = _grads(model, x, 0, False, keys=keys)
    torch.testing.assert_close(k_rev, keys.grad, atol=1e-10, rtol=1e-10)
    for a, b in zip(g_rev, g_plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["lsh", "local", "full"])
@pytest.mark.parametrize("num_mem_kv", [0, 4])
def test_language_model_is_strictly_causal(kind, num_mem_kv, tiny_lm):
    model = tiny_lm(
        num_tokens=50, depth=2, n_hashes=2, max_seq_len=96, attn_layers=(kind,), num_mem_kv=num_mem_kv
    ).eval()
    tokens = torch.randint(0, 50, (2, 96))
    with torch.no_grad():
        base = model(tokens)
        for i in (0, 5, 40, 94):
            changed = tokens.clone()
            changed[:, i + 1 :] = torch.randint(0, 50, changed[:, i + 1 :].shape)
            assert (model(changed)[:, : i + 1] - base[:, : i + 1]).abs().max() <= 1e-5
            torch.testing.assert_close(model(tokens[:, : i + 1]), base[:, : i + 1], atol=1e-5, rtol=0)


def test_eval_forward_is_deterministic():
    model = ReformerLM(num_tokens=20, dim=32, depth=2, heads=2, bucket_size=8, max_seq_len=64).eval()
    tokens = torch.randint(0, 20, (1, 64))
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens))


def test_readme_examples_scaled_down():
    model = ReformerLM(
        num_tokens=200,
        dim=64,
        depth=2,
        max_seq_len=256,
        heads=4,
        lsh_dropout=0.1,
        emb_dim=16,
        causal=True,
        bucket_size=16,
        n_hashes=4,
        ff_chunks=20,
        weight_tie=False,
        attn_chunks=8,
        num_mem_kv=16,
        twin_attention=False,
        use_full_attn=False,
        full_attn_thres=64,
        use_scale_norm=False,
    )
    x = torch.randint(0, 200, (1, 256))
    assert model(x).shape == (1, 256, 200)

    stack = Reformer(dim=64, depth=2, max_seq_len=256, heads=4, lsh_dropout=0.1, causal=True)
    assert stack(torch.randn(1, 256, 64)).shape == (1, 256, 64)

    # sequence to sequence: encoder embeddings as keys of the decoder
    encoder = ReformerLM(
        num_tokens=200,
        emb_dim=16,
        dim=64,
        depth=2,
        heads=4,
        max_seq_len=128,
        fixed_position_emb=True,
        return_embeddings=True,
    )
    decoder = ReformerLM(
        num_tokens=200, emb_dim=16, dim=64, depth=2, heads=4, max_seq_len=128, fixed_position_emb=True, causal=True
    )
    x, yi = torch.randint(0, 200, (1, 128)), torch.randint(0, 200, (1, 128))
    enc_keys = encoder(x)
    assert enc_keys.shape == (1, 128, 64)
    yo = decoder(yi, keys=enc_keys)
    assert yo.shape == (1, 128, 200)
    yo.sum().backward()
    assert encoder.token_emb.weight.grad is not None

    # image -> caption, with any (1, n, 512) tensor as the visual embedding
    encoder = Reformer(dim=512, depth=1, heads=8, max_seq_len=256)
    decoder = ReformerLM(num_tokens=200, dim=512, depth=1, heads=8, max_seq_len=128, causal=True)
    visual_emb = torch.randn(1, 256, 512)
    assert decoder(torch.randint(0, 200, (1, 128)), keys=encoder(visual_emb)).shape == (1, 128, 200)


def test_embedding_options(tiny_lm):
    for kw in (
        dict(absolute_position_emb=True),
        dict(rotary_emb=True),
        dict(axial_position_emb=False),
        dict(weight_tie_embedding=True, emb_dim=16),
        dict(use_rezero=True),
        dict(use_scale_norm=True),
    ):
        model = tiny_lm(num_tokens=30, max_seq_len=40, causal=False, **kw)
        out = model(torch.randint(0, 30, (2, 33)))
        assert out.shape == (2, 33, 30) and torch.isfinite(out).all(), kw


def test_bad_inputs_give_clear_errors(tiny_lm):
    model = tiny_lm(num_tokens=10, dim=16, bucket_size=4, max_seq_len=32, causal=False)
    cases = [
        (torch.tensor([[1, 10]]), "token ids must be in"),
        (torch.tensor([[-1, 2]]), "token ids must be in"),
        (torch.zeros(1, 33, dtype=torch.long), "exceeds max_seq_len"),
        (torch.zeros(1, 4), "integer tensor"),
        (torch.zeros(4, dtype=torch.long), "shape"),
    ]
    for tokens, match in cases:
        with pytest.raises(ValueError, match=match):
            model(tokens)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="keys must have shape"):
        model(tokens, keys=torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="input_mask"):
        model(tokens, input_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="unknown option"):
        ReformerLM(num_tokens=10, dim=16, depht=2)


def test_recorder_records_each_layer_and_ejects():
    from reformer import Autopadder, Recorder

    model = Reformer(dim=32, depth=2, heads=2, bucket_size=8, n_hashes=2, max_seq_len=64, causal=True).eval()
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        plain = model(x)
        rec = Recorder(model)
        out = rec(x)
        torch.testing.assert_close(out, plain)
        assert len(rec.recordings[0]) == 2
        first = rec.recordings[0][0]
        assert first["attn"].shape == (1, 2, 40, 40) and first["buckets"].shape == (1, 2, 2, 40)
        torch.testing.assert_close(first["attn"].sum(-1), torch.ones(1, 2, 40))
        assert torch.all(first["attn"].triu(1) == 0)  # causal
        rec.turn_off()
        rec(x)
        assert 1 not in rec.recordings
        rec.turn_on()
        rec.clear()
        assert not rec.recordings
        back = rec.eject()
        assert back is model and all(not m.lsh_attn.return_attn for m in model.modules() if hasattr(m, "lsh_attn"))
        torch.testing.assert_close(Autopadder(model)(x), plain)


def test_reversible_stack_trains_on_inputs_without_grad():
    model = Reformer(dim=16, depth=2, heads=2, bucket_size=4, max_seq_len=32)
    model(torch.randn(1, 20, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_training_wrapper_loss_and_generate(tiny_lm):
    from reformer import TrainingWrapper

    model = tiny_lm(num_tokens=20, max_seq_len=32)
    wrapper = TrainingWrapper(model, ignore_index=0)
    x = torch.randint(1, 20, (2, 17))
    model.eval()  # deterministic hashing, so the two computations can be compared
    loss = wrapper(x, return_loss=True)
    logits = model(x[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    model.train()
    wrapper(x, return_loss=True).backward()
    torch.manual_seed(0)
    sample = wrapper.generate(x[:, :5], 40, temperature=0.8)
    assert sample.shape == (2, 40) and sample.min() >= 0 and sample.max() < 20
    assert model.training  # restored


@pytest.mark.parametrize("reversible", [True, False])
def test_bf16_autocast_training_step(reversible, tiny_lm):
    model = tiny_lm(num_tokens=30, depth=2, lsh_dropout=0.1, reverse_thres=0 if reversible else 10**9)
    tokens = torch.randint(0, 30, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 30), tokens.reshape(-1))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The same step in fp32 points the same way.
    fp32 = ReformerLM(config=model.config)
    fp32.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    torch.nn.functional.cross_entropy(fp32(tokens).reshape(-1, 30), tokens.reshape(-1)).backward()
    flat = torch.cat([g.flatten() for g in grads])
    ref = torch.cat([p.grad.flatten() for p in fp32.parameters()])
    assert torch.nn.functional.cosine_similarity(flat.float(), ref, dim=0) > 0.95


def test_encoder_decoder_cross_attention():
    from reformer import ReformerEncDec
    from reformer.attention.cross import CrossAttention

    model = ReformerEncDec(
        dim=32,
        heads=2,
        bucket_size=8,
        n_hashes=2,
        enc_num_tokens=30,
        enc_depth=2,
        enc_max_seq_len=64,
        dec_num_tokens=40,
        dec_depth=2,
        dec_max_seq_len=48,
    )
    src, tgt = torch.randint(0, 30, (2, 64)), torch.randint(0, 40, (2, 48))
    src_mask = torch.rand(2, 64) > 0.2
    loss = model(src, tgt, return_loss=True, enc_input_mask=src_mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.encoder.token_emb.weight.grad.abs().sum() > 0  # gradient reaches the encoder
    model.eval()
    with torch.no_grad():
        logits = model(src, tgt, enc_input_mask=src_mask)
        assert logits.shape == (2, 48, 40)
        ctx = model.encode(src, src_mask)
        out = model.decoder(tgt, context=ctx, context_mask=src_mask)
        torch.testing.assert_close(out, logits)
        # the decoder reads the context only through unmasked positions, and does read it
        ctx_changed = ctx.clone()
        ctx_changed[~src_mask] = torch.randn_like(ctx_changed[~src_mask])
        torch.testing.assert_close(
            model.decoder(tgt, context=ctx_changed, context_mask=src_mask), out, atol=1e-5, rtol=0
        )
        assert not torch.allclose(model.decoder(tgt, context=torch.ones_like(ctx), context_mask=src_mask), out)

    # query chunking does not change cross-attention
    cross = CrossAttention(16, heads=2, query_chunk=5)
    x, context = torch.randn(2, 23, 16), torch.randn(2, 9, 16)
    mask = torch.rand(2, 9) > 0.3
    mask[:, 0] = True
    chunked = cross(x, context, mask)
    cross.query_chunk = 1000
    torch.testing.assert_close(chunked, cross(x, context, mask), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="context="):
        model.decoder(tgt)


def test_decoder_reversible_gradients_reach_the_context():
    dec = ReformerLM(
        num_tokens=20, dim=16, depth=2, heads=2, bucket_size=4, max_seq_len=32, causal=True, cross_attention=True
    ).double()
    tokens = torch.randint(0, 20, (1, 24))
    context = torch.randn(1, 10, 16, dtype=torch.float64, requires_grad=True)
    grads = []
    for thres in (0, 10**9):
        dec.config.reverse_thres = thres
        context.grad = None
        torch.manual_seed(0)  # same training-mode rotations in both runs
        dec(tokens, context=context).sum().backward()
        grads.append(context.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)
