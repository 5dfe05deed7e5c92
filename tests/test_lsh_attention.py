"""LSH attention: the chunked fast path against the dense reference, and its invariances."""

import itertools

import pytest
import torch
from builders import LSH_MODES

from reformer import FullQKAttention, LSHAttention
from reformer.attention import window_plan
from reformer.attention.chunked import lsh_attention_chunked
from reformer.attention.full import full_qk_attention
from reformer.attention.options import LSHOptions
from reformer.attention.reference import full_qk_attention_reference, lsh_attention_reference
from reformer.native import workers as cpu_workers

SWEEP = list(
    itertools.product(
        LSH_MODES,
        [1, 2, 4, 8],  # n_hashes
        [(16, 4), (37, 8), (5, 8)],  # (len, bucket_size): divides, does not, shorter than a bucket
        [False, True],  # padding mask
        [True, False],  # allow_duplicate_attention
        [True, False],  # attend_across_buckets
    )
)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Several blocks of windows even at test sizes, so block boundaries are exercised."""
    monkeypatch.setattr(window_plan, "WINDOW_BLOCK_ELEMENTS", 200)


def _inputs(b, length, d=8, dv=6, dtype=torch.float32):
    qk = torch.randn(b, length, d, dtype=dtype)
    v = torch.randn(b, length, dv, dtype=dtype)
    return qk, v


@pytest.mark.parametrize("mode,n_hashes,shape,masked,dup,across", SWEEP)
def test_chunked_equals_reference(mode, n_hashes, shape, masked, dup, across):
    causal, strict = mode
    length, bucket_size = shape
    qk, v = _inputs(3, length)
    n_buckets = 4
    buckets = torch.randint(0, n_buckets, (3, n_hashes, length))
    key_mask = torch.rand(3, length) > 0.3 if masked else None
    options = LSHOptions(
        bucket_size=bucket_size,
        causal=causal,
        strict_causal=strict,
        allow_duplicate_attention=dup,
        attend_across_buckets=across,
        return_attn=True,
    )
    out, attn = lsh_attention_chunked(qk, v, buckets, options, n_buckets=n_buckets, key_mask=key_mask)
    ref_out, ref_attn = lsh_attention_reference(qk, v, buckets, options, n_buckets=n_buckets, key_mask=key_mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, length), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal,strict", LSH_MODES)
def test_module_uses_its_hash_and_equals_reference(causal, strict):
    layer = LSHAttention(bucket_size=8, n_hashes=4, causal=causal, strict_causal=strict, n_buckets=(2, 4)).eval()
    qk, v = _inputs(4, 45, d=16)
    mask = torch.rand(4, 45) > 0.2
    out, _, buckets = layer(qk, v, input_mask=mask)
    assert buckets.shape == (4, 4, 45) and buckets.max() < 8
    ref, _ = lsh_attention_reference(qk, v, buckets, layer.options, n_buckets=8, key_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_real_buckets_large_sweep_chunked_vs_reference():
    # Buckets from real hashing (clustered, uneven sizes) rather than uniform random ids.
    for causal, strict in LSH_MODES:
        for n_hashes in (1, 2, 4, 8):
            layer = LSHAttention(bucket_size=16, n_hashes=n_hashes, causal=causal, strict_causal=strict).eval()
            layer.return_attn = True
            qk, v = _inputs(2, 200, d=16)
            out, attn, buckets = layer(qk, v)
            ref_out, ref_attn = lsh_attention_reference(qk, v, buckets, layer.options, n_buckets=12)
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
            torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bucket_size", [16, 32, 7])
@pytest.mark.parametrize("n_hashes", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_strict_half_chunk_windows_equal_reference_with_gradients(bucket_size, n_hashes, masked):
    # Strict causal attention runs in windows of s = c / 2 queries and 3c/2 keys (c even), the
    # other modes in whole chunks; both against the dense reference, outputs and gradients, with
    # few buckets so that bucket runs cross window and chunk boundaries.
    assert window_plan.queries_per_window(bucket_size, strict=True) == (bucket_size // 2 if bucket_size % 2 == 0 else 7)
    assert window_plan.queries_per_window(bucket_size, strict=False) == bucket_size
    qk, v = _inputs(2, 150, d=16, dv=8, dtype=torch.float64)
    qk.requires_grad_()
    v.requires_grad_()
    buckets = torch.randint(0, 3, (2, n_hashes, 150))
    options = LSHOptions(bucket_size=bucket_size, causal=True)
    call = dict(n_buckets=3, key_mask=torch.rand(2, 150) > 0.2 if masked else None)
    out, _ = lsh_attention_chunked(qk, v, buckets, options, **call)
    ref, _ = lsh_attention_reference(qk, v, buckets, options, **call)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (qk, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (qk, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_qk_gradient_through_scaling_and_norm_equals_autograd(dtype):
    # The chunked path folds the gradients of q = qk / sqrt(d) and k = qk / |qk| into one by hand;
    # zero vectors (norm under the floor) and tiny ones included.
    qk, v = _inputs(2, 40, d=8, dv=4, dtype=dtype)
    qk[0, 3] = 0.0
    qk[1, 7] = 1e-30
    qk.requires_grad_()
    v.requires_grad_()
    buckets = torch.randint(0, 4, (2, 2, 40))
    options = LSHOptions(bucket_size=8, causal=True)
    out, _ = lsh_attention_chunked(qk, v, buckets, options, n_buckets=4)
    ref, _ = lsh_attention_reference(qk, v, buckets, options, n_buckets=4)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (qk, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (qk, v))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("length", [16, 11])
def test_one_chunk_equals_dense_shared_qk(causal, n_hashes, length):
    qk, v = _inputs(2, length)
    mask = torch.rand(2, length) > 0.25
    layer = LSHAttention(bucket_size=16, n_hashes=n_hashes, causal=causal, strict_causal=False).eval()
    for dup in (True, False):
        layer.allow_duplicate_attention = dup
        out, _, _ = layer(qk, v, input_mask=mask)
        dense, _ = full_qk_attention(qk, v, causal=causal, key_mask=mask)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        dense, full_qk_attention_reference(qk, v, causal=causal, key_mask=mask), atol=1e-6, rtol=0
    )
    full_out, full_attn, _ = FullQKAttention(causal=causal)(qk, v, input_mask=mask)
    torch.testing.assert_close(full_out, dense)


def test_query_with_no_visible_key_attends_to_itself():
    qk, v = _inputs(1, 8)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5] = True
    out, _ = full_qk_attention(qk, v, causal=True, key_mask=mask)
    torch.testing.assert_close(out[0, :5], v[0, :5])  # nothing visible before position 5
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "causal,strict,dup,across",
    [(False, True, True, True), (True, True, False, True), (True, False, False, False), (False, True, False, True)],
)
def test_gradcheck_float64(causal, strict, dup, across):
    qk, v = _inputs(2, 13, d=4, dv=3, dtype=torch.float64)
    qk.requires_grad_()
    v.requires_grad_()
    buckets = torch.randint(0, 4, (2, 2, 13))
    mask = torch.rand(2, 13) > 0.2

    options = LSHOptions(
        bucket_size=4, causal=causal, strict_causal=strict, allow_duplicate_attention=dup, attend_across_buckets=across
    )

    def fn(a, b):
        return lsh_attention_chunked(a, b, buckets, options, n_buckets=4, key_mask=mask)[0]

    assert torch.autograd.gradcheck(fn, (qk, v), eps=1e-6, atol=1e-5)


def test_gradcheck_with_dropout_replayed_from_the_seed():
    qk, v = _inputs(1, 11, d=4, dv=3, dtype=torch.float64)
    qk.requires_grad_()
    v.requires_grad_()
    buckets = torch.randint(0, 2, (1, 2, 11))

    def fn(a, b):
        torch.manual_seed(7)
        return lsh_attention_chunked(a, b, buckets, LSHOptions(bucket_size=4, lsh_dropout=0.3), n_buckets=2,
                                     training=True)[0]  # fmt: skip

    assert torch.autograd.gradcheck(fn, (qk, v), eps=1e-6, atol=1e-5)
    torch.manual_seed(7)
    a = fn(qk, v)
    assert not torch.allclose(a, lsh_attention_chunked(qk, v, buckets, LSHOptions(bucket_size=4), n_buckets=2)[0])


def test_block_size_does_not_change_results_or_gradients(monkeypatch):
    qk, v = _inputs(2, 70, d=8)
    buckets = torch.randint(0, 4, (2, 3, 70))
    results = []
    for elements in (1, 300, 2**20):
        monkeypatch.setattr(window_plan, "WINDOW_BLOCK_ELEMENTS", elements)
        a, b = qk.clone().requires_grad_(), v.clone().requires_grad_()
        out, _ = lsh_attention_chunked(a, b, buckets, LSHOptions(bucket_size=8, causal=True), n_buckets=4)
        out.square().sum().backward()
        results.append((out, a.grad, b.grad))
    for other in results[1:]:
        for x, y in zip(results[0], other, strict=True):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dropout,dtype", [(0.0, torch.float32), (0.2, torch.float32), (0.0, torch.bfloat16)])
def test_cpu_worker_split_gives_the_same_bits_as_one_thread(monkeypatch, dropout, dtype):
    qk, v = _inputs(5, 70, d=8, dtype=dtype)  # 5 rows: uneven parts
    buckets = torch.randint(0, 4, (5, 3, 70))
    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(cpu_workers, "worker_count", lambda workers=workers: workers)
        a, b = qk.clone().requires_grad_(), v.clone().requires_grad_()
        torch.manual_seed(3)
        options = LSHOptions(bucket_size=8, causal=True, lsh_dropout=dropout)
        out, _ = lsh_attention_chunked(a, b, buckets, options, n_buckets=4, training=True)
        out.square().sum().backward()
        results.append((out, a.grad, b.grad))
    for other in results[1:]:
        for x, y in zip(results[0], other, strict=True):
            assert torch.equal(x, y)


def _first_change(layer, length, d=16):
    """Largest change of outputs at positions <= i when positions > i change (over several i)."""
    qk, v = _inputs(2, length, d=d)
    base, _, _ = layer(qk, v)
    worst = 0.0
    for i in sorted({0, 1, length // 3, length // 2, length - 2}):
        qk2, v2 = qk.clone(), v.clone()
        qk2[:, i + 1 :] = torch.randn_like(qk2[:, i + 1 :])
        v2[:, i + 1 :] = torch.randn_like(v2[:, i + 1 :])
        out, _, _ = layer(qk2, v2)
        worst = max(worst, (out[:, : i + 1] - base[:, : i + 1]).abs().max().item())
    return worst


@pytest.mark.parametrize("length,bucket_size", [(64, 8), (100, 16), (33, 4), (256, 32)])
@pytest.mark.parametrize("n_hashes", [1, 4])
def test_strict_causal_outputs_ignore_the_future(length, bucket_size, n_hashes):
    layer = LSHAttention(bucket_size=bucket_size, n_hashes=n_hashes, causal=True, n_buckets=4).eval()
    assert _first_change(layer, length) <= 1e-6
    layer.allow_duplicate_attention = False
    assert _first_change(layer, length) <= 1e-6


def test_strict_causal_prefix_is_independent_of_total_length():
    layer = LSHAttention(bucket_size=8, n_hashes=2, causal=True, max_seq_len=128).eval()
    qk, v = _inputs(1, 128)
    full, _, _ = layer(qk, v)
    for n in (1, 9, 50, 77):
        part, _, _ = layer(qk[:, :n], v[:, :n])
        torch.testing.assert_close(part, full[:, :n], atol=1e-6, rtol=0)


def test_classic_causal_leaks_which_is_why_strict_is_default():
    layer = LSHAttention(bucket_size=8, n_hashes=4, causal=True, strict_causal=False, n_buckets=4).eval()
    assert _first_change(layer, 64) > 1e-3  # the check above can fail on a leaky rule


def test_eval_is_deterministic_and_training_is_not():
    layer = LSHAttention(bucket_size=8, n_hashes=2, causal=True)
    qk, v = _inputs(2, 64)
    layer.eval()
    a, _, ba = layer(qk, v)
    b, _, bb = layer(qk, v)
    assert torch.equal(a, b) and torch.equal(ba, bb)
    layer.train()
    c, _, bc = layer(qk, v)
    d, _, bd = layer(qk, v)
    assert not torch.equal(bc, bd) and not torch.equal(c, d)


def test_hash_seed_travels_with_the_state_dict():
    a = LSHAttention(bucket_size=8, n_hashes=2).eval()
    b = LSHAttention(bucket_size=8, n_hashes=2).eval()
    qk, v = _inputs(1, 64)
    assert not torch.equal(a(qk, v)[2], b(qk, v)[2])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(qk, v)[0], b(qk, v)[0])


def test_chunks_do_not_change_the_result():
    layer = LSHAttention(bucket_size=8, n_hashes=3, causal=True).eval()
    qk, v = _inputs(6, 40)
    one, _, _ = layer(qk, v)
    three, _, _ = layer(qk, v, chunks=4)
    torch.testing.assert_close(one, three, atol=1e-6, rtol=0)


def test_dropout_only_in_training():
    layer = LSHAttention(bucket_size=8, n_hashes=2, dropout=0.5, hash_seed=3)
    qk, v = _inputs(2, 32)
    layer.eval()
    ref, _ = lsh_attention_reference(qk, v, layer(qk, v)[2], layer.options, n_buckets=4)
    torch.testing.assert_close(layer(qk, v)[0], ref, atol=1e-5, rtol=0)
    layer.train()
    torch.manual_seed(5)
    a = layer(qk, v)[0]
    torch.manual_seed(5)
    b = layer(qk, v)[0]
    assert torch.equal(a, b)  # replayable from the RNG state (reversible recompute needs this)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_finite_and_close(dtype):
    layer = LSHAttention(bucket_size=16, n_hashes=2, causal=True).eval()
    qk, v = _inputs(2, 96, d=32)
    out32, _, buckets = layer(qk, v)
    out, _ = lsh_attention_chunked(qk.to(dtype), v.to(dtype), buckets, layer.options, n_buckets=6)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref32, _ = lsh_attention_chunked(qk, v, buckets, layer.options, n_buckets=6)
    torch.testing.assert_close(out32, ref32)
    assert (out.float() - ref32).abs().max() < 0.05


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_buckets=3), "n_buckets"),
        (dict(n_buckets=(4, 7)), "n_buckets"),
        (dict(bucket_size=0), "bucket_size"),
        (dict(bucket_size=-4), "bucket_size"),
        (dict(n_hashes=0), "n_hashes"),
        (dict(dropout=1.0), "dropout"),
        (dict(max_seq_len=0), "max_seq_len"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSHAttention(**kwargs)


def test_bad_forward_inputs():
    layer = LSHAttention(bucket_size=4, n_hashes=1)
    qk, v = _inputs(2, 8)
    cases = [
        ((qk[0], v[0]), {}, "qk must have shape"),
        ((qk, v[:, :7]), {}, "agree"),
        ((qk, v[:1]), {}, "agree"),
        ((qk.long(), v), {}, "floating-point"),
        ((qk, v.double()), {}, "same dtype"),
        ((qk, v), {"input_mask": torch.ones(2, 7, dtype=torch.bool)}, "input_mask must have shape"),
        ((qk, v), {"input_mask": torch.ones(2, 8)}, "bool"),
        ((qk, v), {"chunks": 0}, "chunks"),
        ((qk[:, :0], v[:, :0]), {}, "at least one"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            layer(*args, **kwargs)


def test_seed_readme_lsh_attention_example():
    attn = LSHAttention(bucket_size=64, n_hashes=16, causal=True)
    qk = torch.randn(10, 1024, 128)
    v = torch.randn(10, 1024, 128)
    out, attn_weights, buckets = attn(qk, v)
    assert out.shape == (10, 1024, 128) and attn_weights is None
    assert buckets.shape == (10, 16, 1024)


def test_loading_a_state_dict_brings_its_hash_seed_into_eval_hashing():
    """The eval rotations follow the loaded ``hash_seed`` buffer (the layer keeps its value as
    an int, read where the buffer is set rather than at every forward)."""
    qk, v = torch.randn(2, 64, 16), torch.randn(2, 64, 16)
    saved = LSHAttention(bucket_size=8, n_hashes=2, hash_seed=1).eval()
    fresh = LSHAttention(bucket_size=8, n_hashes=2, hash_seed=2).eval()
    fresh(qk, v)  # eval rotations drawn (and cached) for seed 2
    assert not torch.equal(saved(qk, v)[2], fresh(qk, v)[2])
    fresh.load_state_dict(saved.state_dict())
    assert torch.equal(saved(qk, v)[2], fresh(qk, v)[2])  # the buckets


def test_writing_the_hash_seed_buffer_in_place_changes_eval_hashing():
    """A write into the buffer (as DDP's broadcast from rank 0 makes, or ``fill_``), or a new
    buffer, takes effect at the next eager forward."""
    qk, v = torch.randn(2, 64, 16), torch.randn(2, 64, 16)
    seven = LSHAttention(bucket_size=8, n_hashes=2, hash_seed=7).eval()
    layer = LSHAttention(bucket_size=8, n_hashes=2, hash_seed=2).eval()
    layer(qk, v)  # eval rotations drawn (and cached) for seed 2
    with torch.no_grad():
        layer.hash_seed.fill_(7)
    assert torch.equal(layer(qk, v)[2], seven(qk, v)[2])
    layer.hash_seed = torch.tensor(2)
    assert torch.equal(layer(qk, v)[2], LSHAttention(bucket_size=8, n_hashes=2, hash_seed=2).eval()(qk, v)[2])
    assert not torch.equal(layer(qk, v)[2], seven(qk, v)[2])
