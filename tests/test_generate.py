"""Generation: cached decoding == full recompute at every step, sampling, filters, errors."""

import warnings

import pytest
import torch

from reformer import Autopadder, ReformerLM, TrainingWrapper
from reformer.attention.decode import DecodingCache
from reformer.generate import context_start, filter_logits, generate

BASE = dict(num_tokens=24, dim=32, depth=2, heads=2, bucket_size=4, max_seq_len=96, causal=True)

CASES = {
    "lsh-1-axial": dict(n_hashes=1, n_buckets=4),
    "lsh-4-axial": dict(n_hashes=4, n_buckets=4),
    "lsh-4-rotary-mem-nodup": dict(n_hashes=4, rotary_emb=True, num_mem_kv=3, allow_duplicate_attention=False),
    "lsh-2-fixed-localheads": dict(n_hashes=2, fixed_position_emb=True, n_local_attn_heads=1, n_buckets=6),
    "lsh-2-absolute-factorised-perhead": dict(
        n_hashes=2, absolute_position_emb=True, n_buckets=(2, 4), random_rotations_per_head=True
    ),
    "local-axial-mem": dict(attn_layers=("local",), num_mem_kv=2),
    "full-rotary": dict(attn_layers=("full",), rotary_emb=True),
    "mixed-layers-twin-tied": dict(attn_layers=("local", "lsh", "full"), depth=3, twin_attention=True, n_hashes=4),
    "weight-tie": dict(weight_tie=True, n_hashes=2, n_buckets=2),
    # dense while the sequence is short, LSH after 20 positions (mem included): decoding refills once
    "across-full-attn-thres": dict(n_hashes=4, full_attn_thres=20, num_mem_kv=2, n_buckets=4),
    "reverse-thres": dict(n_hashes=2, reverse_thres=16, ff_chunks=3),
    "trax-numerics": dict(
        n_hashes=2, qk_logit_scale=0.5, self_attn_value=-1e5, reversible_output="concat", attn_out_bias=True
    ),
}


def _model(**options) -> ReformerLM:
    model = ReformerLM(**{**BASE, **options}).eval()
    with torch.no_grad():  # a sharper random model: its greedy continuations vary more
        model.token_emb.weight.mul_(40)
    return model


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
@torch.no_grad()
def test_cached_logits_equal_full_recompute_at_every_step(options):
    model = _model(**options)
    tokens = torch.randint(0, 24, (3, 11))
    cache = DecodingCache()
    cached = model(tokens, cache=cache)
    torch.testing.assert_close(cached, model(tokens), atol=1e-4, rtol=0)
    for _ in range(64):
        full = model(tokens)[:, -1]
        torch.testing.assert_close(cached[:, -1], full, atol=1e-4, rtol=0)
        nxt = full.argmax(dim=-1, keepdim=True)  # (3, 1) greedy
        tokens = torch.cat([tokens, nxt], dim=1)
        cached = model(nxt, cache=cache)
    torch.testing.assert_close(cached[:, -1], model(tokens)[:, -1], atol=1e-4, rtol=0)
    assert cache.seq_len == tokens.shape[1] == 75


@torch.no_grad()
def test_several_tokens_per_cached_call_and_ring_wrap():
    model = _model(n_hashes=2, n_buckets=2)  # 2 buckets of 4: rings overwrite their oldest entry often
    tokens = torch.randint(0, 24, (2, 90))
    cache = DecodingCache(capacity=8)  # storage has to grow too
    parts = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i : i + 17], cache=cache) for i in (5, 22, 39, 56)]
    parts.append(model(tokens[:, 73:], cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), model(tokens), atol=1e-4, rtol=0)


def test_generate_cached_equals_uncached_also_past_max_seq_len():
    model = _model(n_hashes=2, max_seq_len=24)
    prompt = torch.randint(0, 24, (3, 7))
    greedy = model.generate(prompt, 60, temperature=0)
    assert greedy.shape == (3, 60)
    assert torch.equal(greedy, model.generate(prompt, 60, temperature=0, use_cache=False))
    sampled = model.generate(prompt, 60, top_k=5, seed=3)
    assert torch.equal(sampled, model.generate(prompt, 60, top_k=5, seed=3, use_cache=False))


def test_context_start_keeps_half_a_window_and_grows_again():
    assert [context_start(n, 8) for n in (1, 8, 9, 12, 13, 17, 18)] == [0, 0, 5, 5, 5, 10, 10]
    for n in range(1, 200):  # the context is never longer than the window nor shorter than half
        assert 4 <= n - context_start(n, 8) <= 8 or n < 4


def test_sampling_is_reproducible_with_a_seed():
    model = _model(n_hashes=2)
    prompt = torch.randint(0, 24, (2, 5))
    a = model.generate(prompt, 40, top_p=0.9, seed=1)
    assert a.shape == (2, 40) and torch.equal(a, model.generate(prompt, 40, top_p=0.9, seed=1))
    assert not torch.equal(a, model.generate(prompt, 40, top_p=0.9, seed=2))
    greedy = generate(model, prompt, 3, temperature=0)
    with torch.no_grad():
        assert torch.equal(greedy[:, 0], model(prompt)[:, -1].argmax(-1))


def test_stream_yields_the_generated_tokens_one_step_at_a_time():
    model = _model()
    prompt = torch.randint(0, 24, (2, 4))
    steps = list(model.stream(prompt, 10, seed=0))
    assert len(steps) == 10 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), model.generate(prompt, 10, seed=0))


def test_filters_on_hand_made_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2))[0].tolist() == [True, False, False, True]
    assert torch.isinf(filter_logits(logits, top_k=10)).sum() == 0  # k above the vocabulary keeps all
    # row 0 probabilities ~[0.09, 0.64, 0.24, 0.03]: 0.7 needs the two largest, 0.6 one, 1.0 all
    assert torch.isinf(filter_logits(logits, top_p=0.7))[0].tolist() == [True, False, False, True]
    assert torch.isinf(filter_logits(logits, top_p=0.6))[0].tolist() == [True, False, True, True]
    assert torch.isinf(filter_logits(logits, top_p=1.0))[0].sum() == 0
    # row 1: one token holds ~98% of the mass
    assert torch.isinf(filter_logits(logits, top_p=0.9))[1].tolist() == [True, True, False, True]
    both = filter_logits(logits, top_k=3, top_p=0.7)
    assert torch.isinf(both)[0].tolist() == [True, False, False, True]


def test_eos_token_stops_a_row_and_then_the_stream():
    model = _model()
    prompt = torch.randint(0, 24, (3, 4))
    free = model.generate(prompt, 30, temperature=0)
    eos = int(free[1, 2])  # row 1 produces it at step 2 at the latest
    out = model.generate(prompt, 30, temperature=0, eos_token=eos)
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        if len(hits):  # identical up to the first eos, eos ever after
            first = int(hits[0])
            assert torch.equal(out[row, : first + 1], free[row, : first + 1])
            assert bool((out[row, first:] == eos).all())
    if all((free[r] == eos).any() for r in range(3)):
        last = max(int((free[r] == eos).nonzero()[0]) for r in range(3))
        assert out.shape[1] == last + 1  # stops once every row is done
    else:
        assert out.shape[1] == 30


@pytest.mark.parametrize(
    ("prompt", "kwargs", "match"),
    [
        (torch.zeros(2, 0, dtype=torch.long), {}, "len >= 1"),
        (torch.zeros(1, 97, dtype=torch.long), {}, "more than max_seq_len=96"),
        (torch.zeros(1, 3), {}, "integer"),
        (torch.full((1, 3), 24), {}, "num_tokens"),
        (torch.zeros(1, 3, dtype=torch.long), {"temperature": -1.0}, "temperature"),
        (torch.zeros(1, 3, dtype=torch.long), {"top_k": 0}, "top_k"),
        (torch.zeros(1, 3, dtype=torch.long), {"top_p": 1.5}, "top_p"),
        (torch.zeros(1, 3, dtype=torch.long), {"eos_token": 24}, "eos_token"),
        (torch.zeros(1, 3, dtype=torch.long), {"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_generation_input_gives_a_clear_error(prompt, kwargs, match):
    model = _model()
    n = kwargs.pop("max_new_tokens", 5)
    with pytest.raises(ValueError, match=match):
        model.stream(prompt, n, **kwargs)  # raised at the call, before any token


def test_cache_misuse_gives_a_clear_error():
    model = _model()
    cache = DecodingCache()
    with pytest.raises(ValueError, match="eval mode"):
        model.train()(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    model.eval()
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(2, 94, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="input_mask"):
        model.reformer(torch.randn(2, 1, 32), input_mask=torch.ones(2, 1, dtype=torch.bool), cache=DecodingCache())


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"causal": False}, "not causal"),
        ({"strict_causal": False}, "strict_causal=False"),
        ({"attn_layers": ("local",), "local_qkv": True}, "local_qkv"),
    ],
)
def test_models_a_cache_cannot_reproduce_fall_back_to_recompute(options, reason):
    model = _model(**options)
    prompt = torch.randint(0, 24, (1, 6))
    with pytest.warns(UserWarning, match=reason):
        out = model.generate(prompt, 5, temperature=0)
    assert torch.equal(out, model.generate(prompt, 5, temperature=0, use_cache=False))
    with pytest.raises(ValueError, match=reason):
        model(prompt, cache=DecodingCache())


def test_training_wrapper_and_autopadder_generate():
    model = _model(n_hashes=2)
    wrapper = TrainingWrapper(Autopadder(model))
    prompt = torch.randint(0, 24, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the cache is used
        out = wrapper.generate(prompt, 12, temperature=0.7, seed=4)
    assert out.shape == (12,)  # a 1-D prompt gives a 1-D result, as in reformer_pytorch
    assert torch.equal(out, model.generate(prompt[None], 12, temperature=0.7, top_k=2, seed=4)[0])
