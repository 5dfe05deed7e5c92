"""Property-based sweeps (hypothesis): every attention path against its dense reference over
random shapes, bucket sizes, rounds, masks, causal modes and dtypes; the model's strict
causality; reversible == plain gradients. Derandomized, so CI runs the same examples."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reformer import Reformer, ReformerLM
from reformer.attention import window_plan
from reformer.attention.chunked import lsh_attention_chunked
from reformer.attention.full import full_qk_attention
from reformer.attention.local import local_attention_chunked
from reformer.attention.reference import (
    full_qk_attention_reference,
    local_attention_reference,
    lsh_attention_reference,
)

SWEEP = settings(max_examples=150, deadline=None, derandomize=True)
SMALL = settings(max_examples=40, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.float64])
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


@st.composite
def attention_inputs(draw, max_len=70):
    """Random ``qk``, ``v``, key mask and a seed, of a random size and dtype."""
    dtype = draw(DTYPES)
    b, length = draw(st.integers(1, 3)), draw(st.integers(1, max_len))
    d, dv = draw(st.integers(1, 12)), draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))  # peaked and flat softmaxes
    qk = (torch.randn(b, length, d, generator=gen) * scale).to(dtype).requires_grad_()
    v = torch.randn(b, length, dv, generator=gen).to(dtype).requires_grad_()
    mask = torch.rand(b, length, generator=gen) > draw(st.sampled_from([0.0, 0.3, 0.9]))
    return qk, v, (mask if draw(st.booleans()) else None), gen


def _assert_same_with_gradients(fast, reference, inputs, dtype):
    """Outputs equal, and so do the gradients of a random projection of them."""
    weight = torch.randn(fast.shape, dtype=dtype)
    grads_fast = torch.autograd.grad((fast * weight).sum(), inputs)
    grads_ref = torch.autograd.grad((reference * weight).sum(), inputs)
    tol = TOL[dtype]
    torch.testing.assert_close(fast, reference, atol=tol, rtol=tol)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


@SWEEP
@given(
    data=attention_inputs(),
    bucket_size=st.integers(1, 12),
    n_hashes=st.sampled_from([1, 2, 3, 4, 8]),
    n_buckets=st.sampled_from([2, 4, 6, 8]),
    mode=st.sampled_from([(False, True), (True, True), (True, False)]),
    dup=st.booleans(),
    across=st.booleans(),
    block=st.sampled_from([50, 2**20]),
)
def test_lsh_chunked_equals_reference(data, bucket_size, n_hashes, n_buckets, mode, dup, across, block):
    qk, v, mask, gen = data
    buckets = torch.randint(0, n_buckets, (qk.shape[0], n_hashes, qk.shape[1]), generator=gen)
    kw = dict(
        bucket_size=bucket_size,
        n_buckets=n_buckets,
        causal=mode[0],
        strict_causal=mode[1],
        key_mask=mask,
        allow_duplicate_attention=dup,
        attend_across_buckets=across,
    )
    with pytest.MonkeyPatch.context() as patch:  # small blocks: block boundaries inside the sequence
        patch.setattr(window_plan, "WINDOW_BLOCK_ELEMENTS", block)
        out, _ = lsh_attention_chunked(qk, v, buckets, **kw)
    ref, _ = lsh_attention_reference(qk, v, buckets, **kw)
    _assert_same_with_gradients(out, ref, (qk, v), qk.dtype)


@SWEEP
@given(data=attention_inputs(), window=st.integers(1, 16), causal=st.booleans(), look_forward=st.integers(0, 1))
def test_local_attention_equals_reference(data, window, causal, look_forward):
    qk, v, mask, _ = data
    kw = dict(window_size=window, causal=causal, look_forward=look_forward, key_mask=mask)
    out = local_attention_chunked(qk, v, **kw)
    _assert_same_with_gradients(out, local_attention_reference(qk, v, **kw), (qk, v), qk.dtype)


@SWEEP
@given(data=attention_inputs(), causal=st.booleans())
def test_full_attention_equals_reference(data, causal):
    qk, v, mask, _ = data
    out, _ = full_qk_attention(qk, v, causal=causal, key_mask=mask)
    ref = full_qk_attention_reference(qk, v, causal=causal, key_mask=mask)
    _assert_same_with_gradients(out, ref, (qk, v), qk.dtype)


MODEL_OPTIONS = st.fixed_dictionaries(
    {
        "bucket_size": st.sampled_from([2, 4, 8]),
        "n_hashes": st.sampled_from([1, 2, 4]),
        "attn_layers": st.sampled_from([("lsh",), ("local", "lsh"), ("lsh", "full")]),
        "num_mem_kv": st.sampled_from([0, 3]),
        "n_local_attn_heads": st.sampled_from([0, 1]),
        "rotary_emb": st.booleans(),
    }
)


@SMALL
@given(options=MODEL_OPTIONS, length=st.integers(2, 60), data=st.data())
@torch.no_grad()
def test_model_outputs_never_depend_on_later_tokens(options, length, data):
    model = ReformerLM(num_tokens=16, dim=16, depth=2, heads=2, max_seq_len=64, causal=True, **options).eval()
    tokens = torch.randint(0, 16, (2, length))
    cut = data.draw(st.integers(1, length - 1))
    changed = tokens.clone()
    changed[:, cut:] = torch.randint(0, 16, (2, length - cut))
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :cut], after[:, :cut], atol=1e-5, rtol=0)


@SMALL
@given(options=MODEL_OPTIONS, causal=st.booleans(), length=st.integers(1, 40), seed=st.integers(0, 1000))
def test_reversible_gradients_equal_plain_gradients(options, causal, length, seed):
    model = Reformer(
        dim=16, depth=2, heads=2, max_seq_len=64, causal=causal, lsh_dropout=0.2, ff_dropout=0.2, **options
    ).double()
    x = torch.randn(1, length, 16, dtype=torch.float64)
    grads = []
    for reverse_thres in (0, 10**9):  # reversible, then plain
        model.config.reverse_thres = reverse_thres
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        model(x).pow(2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@SWEEP
@given(
    data=attention_inputs(max_len=48),
    bucket_size=st.integers(2, 12),
    n_hashes=st.sampled_from([1, 2, 4]),
    mode=st.sampled_from([(False, True), (True, True), (True, False)]),
    low=st.sampled_from([torch.bfloat16, torch.float16]),
)
def test_low_precision_lsh_error_is_at_most_twice_a_dense_computation(data, bucket_size, n_hashes, mode, low):
    """In bf16/fp16 the chunked path errs (against fp64) no more than 2x the dense reference
    evaluated in the same precision (plus a floor at the precision's resolution)."""
    qk, v, mask, gen = data
    qk, v = qk.detach().double(), v.detach().double()
    buckets = torch.randint(0, 4, (qk.shape[0], n_hashes, qk.shape[1]), generator=gen)
    kw = dict(bucket_size=bucket_size, n_buckets=4, causal=mode[0], strict_causal=mode[1], key_mask=mask)
    exact, _ = lsh_attention_reference(qk, v, buckets, **kw)
    ours, _ = lsh_attention_chunked(qk.to(low), v.to(low), buckets, **kw)
    dense, _ = lsh_attention_reference(qk.to(low), v.to(low), buckets, **kw)
    floor = torch.finfo(low).eps * v.abs().max()
    assert (ours.double() - exact).abs().max() <= 2 * (dense.double() - exact).abs().max() + floor
