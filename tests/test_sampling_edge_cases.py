"""Sampling never fails inside torch: odd temperatures, top-p values, logits and seeds, empty
prompts and batches, small integer token dtypes - each either works by a stated rule or is a
ValueError naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import tiny_lm

from reformer import ReformerLM
from reformer.generate import sampling_probs


@pytest.fixture(scope="module")
def model() -> ReformerLM:
    torch.manual_seed(0)
    return tiny_lm(num_tokens=20, dim=16, bucket_size=4, max_seq_len=32).eval()


PROMPT = torch.tensor([[1, 5, 7, 2], [3, 3, 9, 0]])


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=-1e-30), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=float("inf")), "top_p"),
        (dict(seed=1.5), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(seed=True), "seed"),
        (dict(seed="3"), "seed"),
    ],
)
def test_invalid_sampling_options_are_a_value_error_naming_them(model, options, name):
    with pytest.raises(ValueError, match=name):
        model.generate(PROMPT, 3, **options)


@pytest.mark.parametrize("seed", [0, -1, 2**63 - 1, 2**64 - 1, np.int64(7)])
def test_any_int64_or_uint64_seed_samples_reproducibly(model, seed):
    first = model.generate(PROMPT, 6, seed=seed)
    assert first.shape == (2, 6) and torch.equal(first, model.generate(PROMPT, 6, seed=seed))


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 5e-324])
def test_tiny_temperature_is_greedy(model, temperature):
    greedy = model.generate(PROMPT, 8, temperature=0)
    assert torch.equal(model.generate(PROMPT, 8, temperature=temperature, seed=0), greedy)
    assert torch.equal(model.generate(PROMPT, 8, temperature=temperature, top_p=1e-300, seed=1), greedy)


def test_tiny_top_p_keeps_the_most_likely_token(model):
    assert torch.equal(model.generate(PROMPT, 8, top_p=1e-30, seed=0), model.generate(PROMPT, 8, temperature=0))


def test_sampling_probs_of_infinite_logits_follow_the_largest_ones():
    inf = float("inf")
    logits = torch.tensor(
        [
            [-inf, -inf, -inf, -inf],  # nothing larger than anything: uniform
            [inf, 0.0, inf, -inf],  # the +inf ones share everything
            [1.0, 2.0, -inf, 2.0],  # ordinary, with a hidden token
        ]
    )
    for temperature in (1.0, 1e-30, 1e30):
        probs = sampling_probs(logits, temperature)
        assert probs.isfinite().all()
        torch.testing.assert_close(probs[0], torch.full((4,), 0.25))
        torch.testing.assert_close(probs[1], torch.tensor([0.5, 0.0, 0.5, 0.0]))
        assert probs[2, 2] == 0 and probs[2, 1] == probs[2, 3]
    torch.testing.assert_close(sampling_probs(logits[2:], 1.0)[0], torch.softmax(logits[2], -1))
    assert torch.multinomial(sampling_probs(logits, 1e-30, top_k=2, top_p=0.5), 1).shape == (3, 1)


def test_rows_of_minus_inf_logits_sample_uniformly_and_nan_logits_are_an_error(model, monkeypatch):
    logits = torch.zeros(2, 1, 20)
    logits[0] = -float("inf")
    monkeypatch.setattr(model, "forward", lambda tokens, **kw: logits.expand(2, tokens.shape[1], 20))
    out = model.generate(PROMPT, 200, seed=0, use_cache=False)
    assert out.shape == (2, 200) and len(out[0].unique()) > 10  # every token equally likely
    assert torch.equal(model.generate(PROMPT, 2, temperature=0, use_cache=False)[0], torch.zeros(2).long())
    logits[1, 0, 3] = float("nan")
    for temperature in (0, 1.0):
        with pytest.raises(ValueError, match=r"logits are NaN in batch rows \[1\]"):
            model.generate(PROMPT, 2, temperature=temperature, use_cache=False)


def test_empty_prompt_is_a_value_error_and_an_empty_batch_an_empty_result(model):
    with pytest.raises(ValueError, match="prompt must be .* len >= 1"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    for use_cache in (True, False):
        out = model.generate(torch.zeros(0, 4, dtype=torch.long), 3, use_cache=use_cache)
        assert out.shape == (0, 0) and out.dtype == torch.long
        assert list(model.stream(torch.zeros(0, 4, dtype=torch.long), 3)) == []


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_prompts_give_the_int64_result_of_the_same_prompt(model, dtype):
    for use_cache in (True, False):
        out = model.generate(PROMPT.to(dtype), 6, seed=2, use_cache=use_cache)
        assert out.dtype == torch.long
        assert torch.equal(out, model.generate(PROMPT, 6, seed=2, use_cache=use_cache))
