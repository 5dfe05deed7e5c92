"""The options of ``reformer_pytorch`` 1.4.4 do what they do there: each checked against an
equivalent computation (or the peer's own component where it is the same function)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reformer import (
    FullQKAttention,
    LSHAttention,
    LSHSelfAttention,
    Reformer,
    ReformerConfig,
    ReformerEncDec,
    ReformerLM,
    TrainingWrapper,
)
from reformer.attention.decode import DecodingCache
from reformer.attention.options import LSHOptions
from reformer.feedforward import FeedForward
from reformer.pkm import PKM


def test_pkm_equals_product_key_memory():
    """Same parameters -> same outputs as the package reformer_pytorch builds its PKM layers from."""
    pkm_package = pytest.importorskip("product_key_memory", reason="the compat extra is not installed")
    torch.manual_seed(0)
    theirs = pkm_package.PKM(48, num_keys=40, topk=32, dim_head=16)
    ours = PKM(48, num_keys=40, dim_head=16)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 37, 48)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)


def test_pkm_is_per_position():
    """A memory lookup reads one position: changing others leaves it unchanged (causal-safe)."""
    pkm = PKM(16, num_keys=32, dim_head=8)
    x = torch.randn(1, 20, 16)
    y = x.clone()
    y[:, 10:] = torch.randn(1, 10, 16)
    torch.testing.assert_close(pkm(y)[:, :10], pkm(x)[:, :10], atol=0, rtol=0)


def test_pkm_layers_replace_those_feedforwards():
    model = Reformer(dim=16, depth=4, heads=2, bucket_size=4, pkm_layers=(2, 4), pkm_num_keys=32)
    kinds = [type(block.g.fn).__name__ for block in model.blocks]
    assert kinds == ["FeedForward", "PKM", "FeedForward", "PKM"]
    tied = Reformer(dim=16, depth=4, heads=2, bucket_size=4, pkm_layers=(2, 4), pkm_num_keys=32, weight_tie=True)
    gs = [block.g for block in tied.blocks]
    assert gs[0] is gs[2] and gs[1] is gs[3] and gs[0] is not gs[1]
    assert all(block.f is tied.blocks[0].f for block in tied.blocks)
    out = model(torch.randn(2, 24, 16))
    out.sum().backward()
    assert model.blocks[1].g.fn.values.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pkm_layers"):
        ReformerConfig(depth=2, pkm_layers=(3,))
    with pytest.raises(ValueError, match="pkm_num_keys"):
        ReformerConfig(depth=2, pkm_layers=(1,), pkm_num_keys=16)
    assert ReformerConfig(depth=2, pkm_layers=2).pkm_layers == (2,)  # one int, as reformer_pytorch takes it


def test_one_value_head_equals_repeated_values():
    """One shared value projection == every head's value projection set to that one."""
    torch.manual_seed(0)
    options = dict(dim=32, heads=4, bucket_size=8, n_hashes=2, causal=True, hash_seed=3, n_local_attn_heads=1)
    one = LSHSelfAttention(**options, one_value_head=True).eval()
    full = LSHSelfAttention(**options).eval()
    assert one.tov.weight.shape == (8, 32)
    full.toqk.load_state_dict(one.toqk.state_dict())
    full.to_out.load_state_dict(one.to_out.state_dict())
    full.tov.weight.data = one.tov.weight.data.repeat(4, 1)
    x = torch.randn(2, 50, 32)
    torch.testing.assert_close(one(x), full(x), atol=1e-6, rtol=1e-5)


def test_one_value_head_cached_decoding_equals_forward():
    torch.manual_seed(0)
    model = ReformerLM(num_tokens=20, dim=32, depth=2, heads=4, bucket_size=4, max_seq_len=64, causal=True,
                       one_value_head=True).eval()  # fmt: skip
    tokens = torch.randint(0, 20, (2, 30))
    cache = DecodingCache()
    model(tokens[:, :29], cache=cache)
    torch.testing.assert_close(model(tokens[:, 29:], cache=cache), model(tokens)[:, 29:], atol=1e-5, rtol=1e-4)


def test_ff_activation_module_class():
    torch.manual_seed(0)
    ff = FeedForward(8, mult=2, activation=nn.LeakyReLU)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(ff(x), ff.w2(F.leaky_relu(ff.w1(x))))
    cfg = ReformerConfig(ff_activation=nn.LeakyReLU)
    assert cfg.ff_activation == "LeakyReLU"  # stored by name: the config stays JSON
    assert ReformerConfig.from_dict(cfg.to_dict()).ff_activation == "LeakyReLU"
    assert ReformerConfig(ff_activation=None).ff_activation == "gelu"  # reformer_pytorch's default

    class Custom(nn.Module):
        def forward(self, x):
            return x.tanh()

    cfg = ReformerConfig(ff_activation=Custom)
    model = Reformer(config=ReformerConfig(dim=8, depth=1, heads=2, ff_activation=Custom))
    assert isinstance(model.blocks[0].g.fn.act, Custom)
    with pytest.raises(ValueError, match="cannot be saved"):
        cfg.to_dict()
    with pytest.raises(ValueError, match="ff_activation"):
        ReformerConfig(ff_activation="Linear2")


def test_lsh_option_names_of_reformer_pytorch():
    model = Reformer(dim=16, depth=1, heads=2, lsh_allow_duplicate_attention=False, lsh_attend_across_buckets=False)
    assert not model.config.allow_duplicate_attention and not model.config.attend_across_buckets
    attn = model.blocks[0].f.fn.lsh_attn
    assert not attn.allow_duplicate_attention and not attn.attend_across_buckets
    with pytest.raises(TypeError, match="not both"):
        Reformer(dim=16, depth=1, attend_across_buckets=True, lsh_attend_across_buckets=False)


def test_reformer_without_length_limit():
    """Built from keywords, ``Reformer`` has no max_seq_len: bidirectional layers derive their
    bucket count from the input length (as a bare layer); causal ones fix it (4096 positions'
    worth), so a prefix's outputs do not depend on how long the sequence is."""
    free = Reformer(dim=16, depth=1, heads=2, bucket_size=8)
    assert free.config.max_seq_len is None and free.blocks[0].f.fn.lsh_attn.n_buckets is None
    assert free(torch.randn(1, 5000, 16)).shape == (1, 5000, 16)
    torch.manual_seed(0)
    causal = Reformer(dim=16, depth=2, heads=2, bucket_size=8, causal=True).eval()
    assert causal.blocks[0].f.fn.lsh_attn.n_buckets == 4096 // 8
    x = torch.randn(1, 900, 16)
    with torch.no_grad():
        torch.testing.assert_close(causal(x[:, :300]), causal(x)[:, :300], atol=1e-5, rtol=1e-4)
    assert Reformer(dim=16, depth=1, max_seq_len=64).config.max_seq_len == 64
    with pytest.raises(ValueError, match="max_seq_len"):
        ReformerLM(num_tokens=10, dim=16, depth=1, max_seq_len=None)


def _enc_dec(**options) -> ReformerEncDec:
    torch.manual_seed(0)
    sizes = dict(enc_num_tokens=30, enc_depth=1, enc_max_seq_len=40, dec_num_tokens=20, dec_depth=1, dec_max_seq_len=24)
    return ReformerEncDec(dim=32, heads=2, n_hashes=2, enc_bucket_size=4, **sizes, **options)


def test_encoder_decoder_masks():
    # (dense encoder attention: in LSH, masked tokens still take places in the sorted chunks)
    model = _enc_dec(enc_use_full_attn=True).eval()
    assert model.decoder.config.bucket_size == 8  # twice the encoder's, as in reformer_pytorch
    assert model.ignore_index == 0
    seq_in, seq_out = torch.randint(0, 30, (2, 40)), torch.randint(2, 20, (2, 24))
    enc_mask = torch.rand(2, 40) > 0.3
    dec_mask = torch.ones(2, 24, dtype=torch.bool)
    dec_mask[1, 20:] = False
    with torch.no_grad():
        loss = model(seq_in, seq_out, return_loss=True, enc_input_mask=enc_mask, dec_input_mask=dec_mask)
        changed = seq_in.masked_fill(~enc_mask, 7)  # masked input tokens are not seen
        same = model(changed, seq_out, return_loss=True, enc_input_mask=enc_mask, dec_input_mask=dec_mask)
        torch.testing.assert_close(same, loss, atol=1e-6, rtol=1e-6)
        context = model.encoder(seq_in, input_mask=enc_mask)
        logits = model.decoder(seq_out[:, :-1], input_mask=dec_mask[:, :-1], context=context, context_mask=enc_mask)
        torch.testing.assert_close(loss, F.cross_entropy(logits.transpose(1, 2), seq_out[:, 1:]))
        assert not torch.allclose(model(seq_in, seq_out, return_loss=True), loss)  # the masks are used
    with pytest.raises(TypeError, match="enc_"):
        model(seq_in, seq_out, input_mask=enc_mask)


def test_encoder_decoder_generate_is_greedy_decoding():
    model = _enc_dec()
    seq_in = torch.randint(0, 30, (2, 40))
    enc_mask = torch.rand(2, 40) > 0.3
    start = torch.zeros(2, 1, dtype=torch.long)
    out = model.generate(seq_in, start, seq_len=10, temperature=0, enc_input_mask=enc_mask)
    assert out.shape == (2, 10) and model.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        context = model.encoder(seq_in, input_mask=enc_mask)
        tokens = start
        for _ in range(10):
            logits = model.decoder(tokens, context=context, context_mask=enc_mask)[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, tokens[:, 1:])
    assert model.generate(seq_in[:1], start[0], seq_len=5).shape == (5,)  # a 1-D start gives 1-D


def test_training_wrapper_on_a_list_of_sequences(tiny_lm):
    torch.manual_seed(0)
    net = tiny_lm(num_tokens=20, dim=16, bucket_size=4)
    wrapper = TrainingWrapper(net, ignore_index=0, pad_value=0)
    seqs = [torch.randint(1, 20, (n,)) for n in (5, 17, 11)]
    padded = torch.zeros(3, 16, dtype=torch.long)
    targets = torch.zeros(3, 16, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s) - 1], targets[i, : len(s) - 1] = s[:-1], s[1:]
    net.eval()
    expected = F.cross_entropy(net(padded).transpose(1, 2), targets, ignore_index=0)
    torch.testing.assert_close(wrapper(seqs, return_loss=True), expected)
    assert wrapper(seqs).shape == (3, 17, 20)
    with pytest.raises(ValueError, match="1-D"):
        wrapper([torch.zeros(2, 3, dtype=torch.long)])


def test_training_wrapper_generate_shapes_and_filters(tiny_lm):
    from reformer.generative_tools import top_k, top_p

    net = tiny_lm(num_tokens=20, dim=16, bucket_size=4)
    wrapper = TrainingWrapper(net)
    assert wrapper.generate(torch.tensor([3, 4]), 6).shape == (6,)
    assert wrapper.generate(torch.tensor([[3, 4]]), 6, filter_logits_fn=top_p).shape == (1, 6)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]])
    assert torch.isfinite(top_k(logits, thres=0.7)).sum() == 3  # the top (1 - 0.7) of 10
    kept = torch.isfinite(top_p(logits, thres=0.5))  # the most likely tokens up to mass 0.5
    assert kept[0, -1] and kept.sum() == 1 + int(logits.softmax(-1)[0, -1] < 0.5)
    with pytest.raises(ValueError, match="filter_logits_fn"):
        wrapper.generate(torch.tensor([3]), 2, filter_logits_fn=lambda x, thres: x)
    with pytest.raises(ValueError, match="input_mask"):
        wrapper.generate(torch.tensor([[3, 4]]), 2, input_mask=torch.tensor([[True, False]]))


def test_module_paths_of_reformer_pytorch():
    import reformer
    from reformer import autopadder, generative_tools, recorder, reformer_enc_dec, reformer_pytorch

    assert reformer_pytorch.ReformerLM is reformer.ReformerLM and reformer_pytorch.Reformer is reformer.Reformer
    assert reformer_pytorch.LSHSelfAttention is reformer.LSHSelfAttention
    assert reformer_enc_dec.ReformerEncDec is reformer.ReformerEncDec
    assert recorder.Recorder is reformer.Recorder and autopadder.Autopadder is reformer.Autopadder
    assert generative_tools.TrainingWrapper is reformer.TrainingWrapper


def test_drop_for_hash_rate_hashes_dropped_out_vectors():
    """In training, the buckets are those of the vectors after dropout (drawn after the
    rotations, from torch's RNG); in eval the option does nothing."""
    from reformer.hashing import draw_rotations, hash_vectors

    layer = LSHAttention(bucket_size=4, n_hashes=2, drop_for_hash_rate=0.5, n_buckets=8)
    qk = torch.randn(3, 32, 8)
    torch.manual_seed(1)
    buckets = layer.hash(qk)
    torch.manual_seed(1)
    rotations = draw_rotations(8, 2, 8)
    torch.testing.assert_close(buckets, hash_vectors(F.dropout(qk, 0.5), rotations, 8), atol=0, rtol=0)
    assert not torch.equal(buckets, hash_vectors(qk, rotations, 8))
    plain = LSHAttention(bucket_size=4, n_hashes=2, n_buckets=8, hash_seed=int(layer.hash_seed)).eval()
    assert torch.equal(layer.eval().hash(qk), plain.hash(qk))
    with pytest.raises(ValueError, match="drop_for_hash_rate"):
        LSHSelfAttention(dim=8, heads=2, drop_for_hash_rate=1.5)


def test_one_rotation_gives_each_position_its_best_buckets_as_the_peer_does():
    """rehash_each_round=False: the buckets equal reformer_pytorch's for the same rotation (same
    seed, one draw of its shape), rounds ordered as its ascending sort leaves them."""
    peer = pytest.importorskip("reformer_pytorch.reformer_pytorch", reason="the compat extra is not installed")
    ours = LSHAttention(bucket_size=4, n_hashes=3, rehash_each_round=False, n_buckets=8)
    theirs = peer.LSHAttention(bucket_size=4, n_hashes=3, rehash_each_round=False)
    qk = torch.randn(5, 32, 8)
    torch.manual_seed(2)
    buckets = ours.hash(qk)
    torch.manual_seed(2)
    expected = theirs.hash_vectors(8, qk).view(5, 3, 32) - torch.arange(3)[:, None] * 8  # (their round offsets)
    assert torch.equal(buckets, expected)
    assert (buckets[:, :, None] != buckets[:, None]).sum(dim=(1, 2)).eq(6).all()  # 3 distinct buckets each
    ours.eval()
    assert torch.equal(ours.hash(qk), ours.hash(qk))


@pytest.mark.parametrize("causal", [False, True])
def test_one_rotation_layer_equals_reference_and_stays_strictly_causal(causal):
    from reformer.attention.reference import lsh_attention_reference

    layer = LSHAttention(bucket_size=4, n_hashes=2, causal=causal, rehash_each_round=False, n_buckets=8).eval()
    qk, v = torch.randn(2, 40, 8), torch.randn(2, 40, 8)
    out, _, buckets = layer(qk, v)
    ref, _ = lsh_attention_reference(qk, v, buckets, layer.options, n_buckets=8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    if causal:
        for i in (0, 13, 38):
            qk2, v2 = qk.clone(), v.clone()
            qk2[:, i + 1 :], v2[:, i + 1 :] = torch.randn_like(qk2[:, i + 1 :]), torch.randn_like(v2[:, i + 1 :])
            assert (layer(qk2, v2)[0][:, : i + 1] - out[:, : i + 1]).abs().max() <= 1e-6


def test_one_rotation_needs_enough_buckets():
    with pytest.raises(ValueError, match="n_buckets must be >= n_hashes"):
        LSHAttention(n_hashes=8, n_buckets=4, rehash_each_round=False)
    with pytest.raises(ValueError, match="n_buckets must be >= n_hashes"):  # (derived from the length)
        LSHAttention(bucket_size=4, n_hashes=8, rehash_each_round=False)(torch.randn(1, 16, 8), torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match="int n_buckets"):
        LSHAttention(n_hashes=2, n_buckets=(4, 8), rehash_each_round=False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("query_len", [None, 20])
def test_full_qk_attention_query_len_and_attn_mask_equal_the_peer(causal, query_len):
    """FullQKAttention's forward options, against reformer_pytorch's layer on the same inputs
    (no weights or randomness: outputs and weights must match)."""
    peer = pytest.importorskip("reformer_pytorch.reformer_pytorch", reason="the compat extra is not installed")
    qk, v = torch.randn(2, 32, 8), torch.randn(2, 32, 8)
    n = 32 if query_len is None else query_len
    mask = torch.rand(2, n, 30) > 0.3  # (its last 2 keys unlisted: allowed)
    mask[:, torch.arange(min(n, 30)), torch.arange(min(n, 30))] = (
        True  # (the peer hides a masked own key; we keep it, as LSH does)
    )
    theirs = peer.FullQKAttention(causal=causal)(qk, v, query_len=query_len, input_attn_mask=mask)
    ours = FullQKAttention(causal=causal)(qk, v, query_len=query_len, input_attn_mask=mask)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="query_len must be"):
        FullQKAttention()(qk, v, query_len=33)
    with pytest.raises(ValueError, match="input_attn_mask must"):
        FullQKAttention()(qk, v, input_attn_mask=mask.float())


def test_lsh_attention_query_len_and_pos_emb_equal_the_peer():
    """Not causal, the same buckets (same seed) and chunk layout as reformer_pytorch: its outputs
    with a rotary ``pos_emb`` (applied after hashing) and a ``query_len`` equal ours."""
    peer = pytest.importorskip("reformer_pytorch.reformer_pytorch", reason="the compat extra is not installed")
    pos_emb = peer.FixedPositionalEmbedding(8)(torch.zeros(1, 48, 8))  # (1, 48, 8): [sin | cos]
    ours = LSHAttention(bucket_size=8, n_hashes=2, n_buckets=8)
    theirs = peer.LSHAttention(bucket_size=8, n_hashes=2)
    qk, v = torch.randn(2, 64, 8), torch.randn(2, 64, 8)
    torch.manual_seed(3)
    expected = theirs(qk, v, query_len=40, pos_emb=pos_emb)[0]
    torch.manual_seed(3)
    out, _, _ = ours(qk, v, query_len=40, pos_emb=pos_emb)
    torch.manual_seed(3)
    unturned, _, _ = ours(qk, v, query_len=40)
    assert out.shape == (2, 40, 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert (unturned - expected).abs().max() > 1e-2  # (pos_emb changes the result)


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_attention_query_len_sees_every_keys_only_position(causal):
    """One chunk per round sees everything: classic LSH with ``query_len`` then equals dense
    attention with it (FullQKAttention, itself equal to the peer's), keys-only positions
    visible to every query even when causal."""
    layer = LSHAttention(bucket_size=32, n_hashes=2, causal=causal, strict_causal=False, n_buckets=2).eval()
    layer.return_attn = True
    qk, v = torch.randn(2, 32, 8), torch.randn(2, 32, 8)
    mask = torch.rand(2, 32) > 0.2
    out, attn, buckets = layer(qk, v, 20, mask)
    ref, ref_attn, _ = FullQKAttention(causal=causal)(qk, v, query_len=20, input_mask=mask)
    assert buckets.shape == (2, 2, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=0)


def test_strict_causal_query_len_keeps_later_queries_out():
    layer = LSHAttention(bucket_size=4, n_hashes=2, causal=True, n_buckets=4).eval()
    qk, v = torch.randn(2, 40, 8), torch.randn(2, 40, 8)
    base, _, _ = layer(qk, v, query_len=30)
    for i in (0, 11, 28):
        qk2, v2 = qk.clone(), v.clone()
        qk2[:, i + 1 : 30], v2[:, i + 1 : 30] = torch.randn(2, 29 - i, 8), torch.randn(2, 29 - i, 8)
        assert (layer(qk2, v2, query_len=30)[0][:, : i + 1] - base[:, : i + 1]).abs().max() <= 1e-6
    v3 = v.clone()
    v3[:, 30:] += 1.0  # the keys-only positions are seen (by some query)
    assert (layer(qk, v3, query_len=30)[0] - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="pos_emb must be"):
        layer(qk, v, pos_emb=torch.zeros(1, 41, 8))


def _peer_twin(peer_module, **kw):
    """reformer_pytorch's LSHSelfAttention and ours with the same weights."""
    theirs, ours = peer_module.LSHSelfAttention(**kw), LSHSelfAttention(**kw)
    for name in ("toqk", "tov", "to_out"):
        getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())
    if ours.mem_kv is not None:
        ours.mem_kv.data.copy_(theirs.mem_kv.data)
    return theirs, ours


def test_self_attention_pos_emb_and_input_attn_mask_equal_the_peer():
    """pos_emb on the LSH heads (same seed: same rotations), input_attn_mask on dense attention
    with memory and keys (indexed in the peer's layout, the sequence first)."""
    peer = pytest.importorskip("reformer_pytorch.reformer_pytorch", reason="the compat extra is not installed")
    x = torch.randn(2, 64, 32)
    theirs, ours = _peer_twin(peer, dim=32, heads=2, bucket_size=8, n_hashes=2)
    pos_emb = peer.FixedPositionalEmbedding(16)(torch.zeros(1, 64, 16))
    torch.manual_seed(1)
    expected = theirs(x, pos_emb=pos_emb)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x, pos_emb=pos_emb), expected, atol=1e-5, rtol=0)

    theirs, ours = _peer_twin(peer, dim=32, heads=2, use_full_attn=True, num_mem_kv=3, causal=True)
    keys = torch.randn(2, 5, 32)
    mask = torch.rand(2, 64, 70) > 0.3  # (the last key unlisted: allowed)
    mask[:, torch.arange(64), torch.arange(64)] = True
    expected = theirs(x, keys=keys, input_attn_mask=mask)
    torch.testing.assert_close(ours(x, keys=keys, input_attn_mask=mask), expected, atol=1e-5, rtol=0)
    assert (ours(x, keys=keys) - expected).abs().max() > 1e-3  # (the mask matters)
    with pytest.raises(ValueError, match="input_attn_mask must have shape"):
        ours(x, keys=keys, input_attn_mask=torch.ones(2, 64, 73, dtype=torch.bool))


MASK_MODES = [
    (False, True, True, True),
    (True, True, True, True),
    (True, False, True, True),
    (False, True, False, False),
]


@pytest.mark.parametrize("causal,strict,dup,across", MASK_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # (fp32 on CPU: the C kernels' path)
def test_chunked_pair_mask_equals_reference(causal, strict, dup, across, dtype):
    from reformer.attention.chunked import lsh_attention_chunked
    from reformer.attention.reference import lsh_attention_reference

    qk = torch.randn(3, 45, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(3, 45, 8, dtype=dtype, requires_grad=True)
    buckets = torch.randint(0, 4, (3, 2, 45))
    pairs = torch.rand(3, 45, 45) > 0.4
    key_mask = torch.rand(3, 45) > 0.2
    options = LSHOptions(bucket_size=8, causal=causal, strict_causal=strict, allow_duplicate_attention=dup,
                         attend_across_buckets=across, return_attn=True)  # fmt: skip
    call = dict(n_buckets=4, key_mask=key_mask, attn_mask=pairs)
    out, attn = lsh_attention_chunked(qk, v, buckets, options, **call)
    ref, ref_attn = lsh_attention_reference(qk, v, buckets, options, **call)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    torch.testing.assert_close(attn, ref_attn, atol=tol, rtol=0)
    hidden = ~pairs & ~torch.eye(45, dtype=torch.bool)  # (the own key stays, as without the mask)
    assert attn[hidden].abs().max() == 0
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (qk, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (qk, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=0)


def test_lsh_input_attn_mask_equals_the_peer():
    """Not causal, the same rotations: reformer_pytorch's LSHAttention and LSHSelfAttention with
    an input_attn_mask give our outputs."""
    peer = pytest.importorskip("reformer_pytorch.reformer_pytorch", reason="the compat extra is not installed")
    qk, v = torch.randn(2, 64, 8), torch.randn(2, 64, 8)
    mask = torch.rand(2, 60, 64) > 0.3  # (the last 4 queries unlisted: they see everything)
    ours, theirs = LSHAttention(bucket_size=8, n_hashes=2, n_buckets=8), peer.LSHAttention(bucket_size=8, n_hashes=2)
    torch.manual_seed(4)
    expected = theirs(qk, v, input_attn_mask=mask)[0]
    torch.manual_seed(4)
    torch.testing.assert_close(ours(qk, v, input_attn_mask=mask)[0], expected, atol=1e-5, rtol=0)
    torch.manual_seed(4)
    assert (ours(qk, v)[0] - expected).abs().max() > 1e-3  # (the mask matters)

    theirs, ours = _peer_twin(peer, dim=32, heads=2, bucket_size=8, n_hashes=2)
    x = torch.randn(2, 64, 32)
    mask = torch.rand(2, 64, 64) > 0.3
    torch.manual_seed(5)
    expected = theirs(x, input_attn_mask=mask)
    torch.manual_seed(5)
    torch.testing.assert_close(ours(x, input_attn_mask=mask), expected, atol=1e-5, rtol=0)


def test_fused_backends_refuse_a_pair_mask_and_auto_falls_back():
    from reformer.attention.backends import lsh_attention, resolve_backend

    qk, v, buckets = torch.randn(2, 32, 16), torch.randn(2, 32, 16), torch.randint(0, 4, (2, 1, 32))
    pairs = torch.ones(2, 32, 32, dtype=torch.bool)
    for backend in ("flex", "triton"):
        with pytest.raises(ValueError, match="does not support input_attn_mask"):
            lsh_attention(
                qk, v, buckets, LSHOptions(bucket_size=16, attn_backend=backend), n_buckets=4, attn_mask=pairs
            )
    assert resolve_backend(qk, v, LSHOptions(bucket_size=16), training=False, pair_mask=True) == "chunked"
