"""Backend choice (auto / chunked / flex / triton), flex semantics on CPU, and on CUDA every
backend against the dense reference."""

import itertools
import warnings

import pytest
import torch
from builders import LSH_MODES, lsh_inputs, window_options

from reformer import LSHAttention, ReformerConfig
from reformer.attention import backends
from reformer.attention.backends import lsh_attention, resolve_backend
from reformer.attention.chunked import lsh_attention_chunked
from reformer.attention.common import SELF_ATTN_VALUE
from reformer.attention.options import LSHOptions
from reformer.attention.reference import lsh_attention_reference
from reformer.attention.slots import WindowRules, sort_into_slots

flex = pytest.importorskip("reformer.attention.flex")


def _options(**kw):
    return LSHOptions(**{"bucket_size": 16, **kw})


def test_auto_is_chunked_on_cpu_and_bit_identical():
    layer = LSHAttention(bucket_size=8, n_hashes=2, causal=True, n_buckets=4).eval()
    assert layer.attn_backend == "auto"
    qk, v, _, mask = lsh_inputs(37, 2, True)
    out, _, buckets = layer(qk, v, input_mask=mask)
    expected, _ = lsh_attention_chunked(
        qk, v, buckets, LSHOptions(bucket_size=8, causal=True), n_buckets=4, key_mask=mask
    )
    assert torch.equal(out, expected)
    assert resolve_backend(qk, v, _options(), training=False) == "chunked"


@pytest.mark.parametrize(
    "option,value,named",
    [
        ("return_attn", True, "return_attn"),
        ("allow_duplicate_attention", False, "allow_duplicate_attention"),
        ("exp_lse_softmax", True, "exp_lse"),
        ("lsh_dropout", 0.1, "dropout"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_forcing_a_fused_backend_outside_its_subset_names_the_option(backend, option, value, named):
    qk, v, buckets, _ = lsh_inputs(32, 1, False)
    with pytest.raises(ValueError, match=named):
        lsh_attention(qk, v, buckets, _options(attn_backend=backend, **{option: value}), n_buckets=4, training=True)


def test_auto_falls_back_to_chunked_outside_the_subset():
    qk, v, _, _ = lsh_inputs(32, 1, False)
    assert resolve_backend(qk, v, _options(return_attn=True), training=False) == "chunked"


def test_unavailable_backend_and_bad_names_are_explained():
    qk, v, buckets, _ = lsh_inputs(32, 1, False, d=24)
    with pytest.raises(RuntimeError, match="head dims"):
        lsh_attention(qk, v, buckets, _options(attn_backend="flex"), n_buckets=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        LSHAttention(backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ReformerConfig(attn_backend="fast")


def test_a_registered_backend_is_chosen_or_refused_by_what_it_declares(monkeypatch):
    """A new backend is one table entry: auto chooses it, passes over it for an option, dtype or
    head dim it does not declare, and forcing it there names what is missing."""
    calls = []

    def attention(qk, v, buckets, options, **kw):
        calls.append(options.causal)
        return lsh_attention_chunked(qk, v, buckets, options, **kw)

    dummy = backends.Backend(
        attention, frozenset({"key_mask"}), dtypes=(torch.float32,), head_dims=(16,), auto_devices=("cpu",)
    )
    monkeypatch.setitem(backends.BACKENDS, "dummy", dummy)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("dummy", *backends.AUTO_ORDER))
    qk, v, buckets, mask = lsh_inputs(32, 2, True)
    out, _ = lsh_attention(qk, v, buckets, _options(), n_buckets=4, key_mask=mask)  # auto: first, and it fits
    expected, _ = lsh_attention_chunked(qk, v, buckets, _options(), n_buckets=4, key_mask=mask)
    assert torch.equal(out, expected)
    LSHAttention(bucket_size=16, n_hashes=2, backend="dummy")(qk, v, input_mask=mask)  # a name the layers take
    assert calls == [False, False]
    for refused_qk, refused_v, options in [(qk, v, {"causal": True}), (qk.double(), v.double(), {}),
                                           (torch.randn(2, 32, 32), v, {})]:  # fmt: skip
        assert resolve_backend(refused_qk, refused_v, _options(**options), training=False) == "chunked"
    assert calls == [False, False]
    dummy_options = _options(attn_backend="dummy")
    with pytest.raises(ValueError, match="attn_backend='dummy' does not support causal=True"):
        lsh_attention(qk, v, buckets, dummy_options.replace(causal=True), n_buckets=4)
    with pytest.raises(RuntimeError, match=r"dtype torch.float64 \(needs float32\)"):
        lsh_attention(qk.double(), v.double(), buckets, dummy_options, n_buckets=4)
    with pytest.raises(RuntimeError, match="head dims 32, 16"):
        lsh_attention(torch.randn(2, 32, 32), v, buckets, dummy_options, n_buckets=4)
    with pytest.raises(ValueError, match="unknown features"):
        backends.Backend(attention, frozenset({"causal", "sliding_window"}))


FLEX_SWEEP = list(itertools.product(LSH_MODES, [1, 2], [(37, 8), (64, 16)], [False, True], [True, False]))


@pytest.mark.parametrize("mode,n_hashes,shape,masked,across", FLEX_SWEEP)
def test_flex_forward_on_cpu_equals_chunked(mode, n_hashes, shape, masked, across):
    (causal, strict), (length, bucket_size) = mode, shape
    qk, v, buckets, key_mask = lsh_inputs(length, n_hashes, masked)
    options = window_options(bucket_size, causal, strict, across)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled
        out, _ = lsh_attention(qk, v, buckets, options.replace(attn_backend="flex"), n_buckets=4, key_mask=key_mask)
    expected, _ = lsh_attention_chunked(qk, v, buckets, options, n_buckets=4, key_mask=key_mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_hashes,length", [(1, 16), (2, 64), (3, 40)])
def test_flex_block_mask_is_narrow_and_covers_every_visible_entry(n_hashes, length):
    from torch.nn.attention.flex_attention import create_mask

    qk, v, buckets, key_mask = lsh_inputs(length, n_hashes, True)
    inputs, layout = sort_into_slots(qk, v, buckets, key_mask, 8, 4)
    block_mask = flex.window_block_mask(layout, WindowRules(False, False, True, SELF_ATTN_VALUE))
    n = layout.n
    assert block_mask.kv_indices.shape == (1, 1, n, 2)  # two key blocks per query block, never n x n
    dense = create_mask(block_mask.mask_mod, 2, 1, layout.total, layout.total, device="cpu")  # (2, 1, t, t)
    touched = dense.view(2, n, 8, n, 8).any(dim=(0, 2, 4))  # (n, n) query block x key block
    assert torch.equal(touched & ~_listed(block_mask.kv_num_blocks, block_mask.kv_indices), torch.zeros_like(touched))
    by_key = _listed(block_mask.q_num_blocks, block_mask.q_indices)  # the transposed table, for the backward
    assert torch.equal(by_key.T, _listed(block_mask.kv_num_blocks, block_mask.kv_indices))


def _listed(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` bool table of the blocks listed in narrow ``counts`` ``(1, 1, n)`` / ``indices`` ``(1, 1, n, 2)``."""
    n = counts.shape[-1]
    table = torch.zeros(n, n, dtype=torch.bool)
    for row in range(n):
        table[row, indices[0, 0, row, : counts[0, 0, row]].long()] = True
    return table


GPU_SWEEP = list(
    itertools.product(LSH_MODES, [1, 2, 4, 8], [(16, 16), (37, 16), (200, 32)], [False, True], [True, False])
)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "triton", "flex"])
@pytest.mark.parametrize("mode,n_hashes,shape,masked,across", GPU_SWEEP)
def test_gpu_backend_equals_reference(backend, mode, n_hashes, shape, masked, across):
    (causal, strict), (length, bucket_size) = mode, shape
    qk, v, buckets, key_mask = lsh_inputs(length, n_hashes, masked, d=32, device="cuda", requires_grad=True)
    options = window_options(bucket_size, causal, strict, across)
    out, _ = lsh_attention(qk, v, buckets, options.replace(attn_backend=backend), n_buckets=4, key_mask=key_mask)
    ref, _ = lsh_attention_reference(qk.double(), v.double(), buckets, options, n_buckets=4, key_mask=key_mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qk, v), grad)
    ref_grads = torch.autograd.grad(ref, (qk, v), grad.double())
    for g, e in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), e, atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "triton", "flex"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_error_is_that_of_plain_dense_attention(backend, dtype):
    """One chunk covering the sequence: LSH equals dense shared-QK attention, so a fused
    backend in bf16/fp16 may err at most 2x a textbook dense attention in that dtype."""
    qk, v = torch.randn(4, 64, 64, device="cuda"), torch.randn(4, 64, 64, device="cuda")
    buckets = torch.zeros(4, 1, 64, dtype=torch.long, device="cuda")
    exact, _ = lsh_attention(qk, v, buckets, LSHOptions(bucket_size=64, attn_backend="chunked"), n_buckets=2)

    def dense(x, vals):
        keys = x / x.norm(dim=-1, keepdim=True)
        logits = (x @ keys.transpose(1, 2)) * x.shape[-1] ** -0.5
        logits = logits.masked_fill(torch.eye(64, dtype=torch.bool, device="cuda"), SELF_ATTN_VALUE)
        return torch.softmax(logits, dim=-1) @ vals

    low, _ = lsh_attention(
        qk.to(dtype), v.to(dtype), buckets, LSHOptions(bucket_size=64, attn_backend=backend), n_buckets=2
    )
    ours = (low.float() - exact).abs().max()
    plain = (dense(qk.to(dtype), v.to(dtype)).float() - exact).abs().max()
    assert ours <= 2 * plain, (ours, plain)


@pytest.mark.gpu
def test_gpu_auto_picks_a_fused_backend():
    qk, v, _, _ = lsh_inputs(256, 2, False, d=64, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend(qk, v, _options(bucket_size=64), training=False) in ("triton", "flex")
