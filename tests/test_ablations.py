"""The paper's Fig. 3 ablations as config options: separate-QK dense attention
(``shared_qk=False``) and the standard residual stack (``residual="standard"``)."""

import math

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.attention.dense import DenseSelfAttention
from reformer.convert import to_transformers

SMALL = dict(num_tokens=50, dim=32, depth=2, heads=2, bucket_size=8, n_hashes=2, max_seq_len=64, causal=True)
TRANSFORMER = dict(residual="standard", shared_qk=False, use_full_attn=True)


def naive_attention(layer: DenseSelfAttention, x, keys=None, input_mask=None, context_mask=None):
    """Softmax attention written out, one batch row and head at a time, from the layer's weights."""
    b, t, _ = x.shape
    c = 0 if keys is None else keys.shape[1]
    seq = x if keys is None else torch.cat([keys, x], dim=1)
    inner = layer.heads * layer.dim_head
    wk, wv = layer.to_kv.weight[:inner], layer.to_kv.weight[inner:]
    out = torch.zeros(b, t, inner, dtype=x.dtype)

    def sees(i: int, p: int, j: int) -> bool:  # query p of row i, key j (the extra keys first)
        if j < c:
            return context_mask is None or bool(context_mask[i, j])
        own = j - c == p
        return own or ((not layer.causal or j - c < p) and (input_mask is None or bool(input_mask[i, j - c])))

    for i in range(b):
        for h in range(layer.heads):
            rows = slice(h * layer.dim_head, (h + 1) * layer.dim_head)
            q, k, v = x[i] @ layer.to_q.weight[rows].T, seq[i] @ wk[rows].T, seq[i] @ wv[rows].T
            for p in range(t):
                visible = [j for j in range(c + t) if sees(i, p, j)]
                logits = k[visible] @ q[p] / math.sqrt(layer.dim_head)
                out[i, p, rows] = torch.softmax(logits, 0) @ v[visible]
    return layer.to_out(out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_keys", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_dense_attention_equals_written_out_softmax(causal, with_keys, with_mask):
    torch.manual_seed(0)
    layer = DenseSelfAttention(16, heads=2, causal=causal).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 3, 16, dtype=torch.float64) if with_keys else None
    input_mask = torch.tensor([[True] * 7, [False, True, True, False, True, True, False]]) if with_mask else None
    context_mask = torch.tensor([[True, False, True], [False, False, False]]) if with_keys and with_mask else None
    got = layer(x, keys=keys, input_mask=input_mask, context_mask=context_mask)
    want = naive_attention(layer, x, keys, input_mask, context_mask)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    g_got, g_want = (torch.autograd.grad(y.square().sum(), x)[0] for y in (got, want))
    torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("options", [TRANSFORMER, dict(residual="standard"), dict(shared_qk=False, use_full_attn=True)])
def test_ablated_models_are_strictly_causal(options):
    model = ReformerLM(**SMALL, **options).eval()
    tokens = torch.randint(0, 50, (2, 64))
    with torch.no_grad():
        base = model(tokens)
        for i in (0, 20, 62):
            changed = tokens.clone()
            changed[:, i + 1 :] = torch.randint(0, 50, changed[:, i + 1 :].shape)
            assert (model(changed)[:, : i + 1] - base[:, : i + 1]).abs().max() <= 1e-5


def test_standard_residual_stack_is_x_plus_f_then_x_plus_g():
    """The same blocks as the reversible stack, composed as a pre-norm Transformer."""
    torch.manual_seed(0)
    model = ReformerLM(**SMALL, **TRANSFORMER).eval()
    tokens = torch.randint(0, 50, (2, 64))
    x = model.embed(tokens)
    for block in model.reformer.blocks:
        x = x + block.f(x)
        x = x + block.g(x)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model._head(x), atol=1e-6, rtol=1e-6)
    reversible = ReformerLM(**SMALL, shared_qk=False, use_full_attn=True).eval()
    reversible.load_state_dict(model.state_dict())  # same weights, other composition: another function
    with torch.no_grad():
        assert (reversible(tokens) - model(tokens)).abs().max() > 1e-3


def test_standard_stack_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = ReformerLM(**SMALL, **TRANSFORMER, layer_dropout=0.5)
    tokens = torch.randint(0, 50, (2, 64))
    model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "blocks" not in n)
    model.eval().save_pretrained(tmp_path)
    loaded = ReformerLM.from_pretrained(tmp_path).eval()
    assert loaded.config.residual == "standard" and loaded.config.shared_qk is False
    torch.testing.assert_close(loaded(tokens), model(tokens))


def test_generation_caches_a_standard_lsh_stack_and_recomputes_separate_qk():
    torch.manual_seed(0)
    prompt = torch.randint(0, 50, (2, 9))
    lsh = ReformerLM(**SMALL, residual="standard").eval()
    assert lsh.cache_unsupported_reason() is None
    assert torch.equal(
        lsh.generate(prompt, 12, temperature=0), lsh.generate(prompt, 12, temperature=0, use_cache=False)
    )
    dense = ReformerLM(**SMALL, **TRANSFORMER).eval()
    with pytest.warns(UserWarning, match="shared_qk=False"):
        cached = dense.generate(prompt, 6, temperature=0)
    assert torch.equal(cached, dense.generate(prompt, 6, temperature=0, use_cache=False))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(residual="plain"), "residual must be 'reversible' or 'standard'"),
        (dict(residual="standard", reversible_output="concat"), "reversible_output='concat' needs"),
        (dict(shared_qk=0), "shared_qk must be True or False"),
        (dict(shared_qk=False), "attn_layers=\\['lsh', 'lsh'\\]"),
        (dict(shared_qk=False, attn_layers=("full", "lsh")), "attn_layers"),
        (dict(shared_qk=False, use_full_attn=True, rotary_emb=True), "position_emb='rotary'"),
        (dict(shared_qk=False, use_full_attn=True, num_mem_kv=2), "num_mem_kv=2"),
        (dict(shared_qk=False, use_full_attn=True, n_local_attn_heads=1), "n_local_attn_heads=1"),
    ],
)
def test_bad_ablation_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        ReformerConfig(**{**SMALL, **options})


def test_hugging_face_export_refuses_a_standard_stack():
    pytest.importorskip("transformers")
    from reformer.convert import TRANSFORMERS_LAYOUT

    model = ReformerLM(**{**SMALL, **TRANSFORMERS_LAYOUT, "residual": "standard", "reversible_output": "mean"})
    with pytest.raises(ValueError, match="residual"):
        to_transformers(model)
