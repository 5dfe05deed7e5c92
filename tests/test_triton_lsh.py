"""The fused Triton kernel against the chunked path and the dense reference.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set before triton is imported), so sizes stay small."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from builders import window_options  # noqa: E402

from reformer.attention.backends import lsh_attention  # noqa: E402
from reformer.attention.chunked import lsh_attention_chunked  # noqa: E402
from reformer.attention.reference import lsh_attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # causal, strict_causal, key mask, attend_across_buckets, n_hashes, length, bucket_size
    (False, True, False, True, 1, 64, 16),  # non-causal, one round
    (True, True, False, True, 2, 64, 16),  # strict causal (the default)
    (True, True, True, True, 2, 50, 16),  # strict causal, padding, length not a multiple
    (True, False, True, True, 2, 64, 16),  # classic causal
    (True, False, True, False, 2, 64, 16),  # classic, same-bucket only; queries that see only themselves
    (False, True, True, True, 2, 45, 12),  # bucket not a power of two: dead lanes in each block
    (False, True, False, True, 1, 12, 16),  # one chunk: the window holds it twice
]


def _case(causal, strict, masked, across, n_hashes, length, bucket_size, d=32):
    qk = torch.randn(2, length, d, device=DEVICE, requires_grad=True)
    v = torch.randn(2, length, d, device=DEVICE, requires_grad=True)
    buckets = torch.randint(0, 4, (2, n_hashes, length), device=DEVICE)
    key_mask = torch.rand(2, length, device=DEVICE) > 0.3 if masked else None
    options = window_options(bucket_size, causal, strict, across)
    return qk, v, buckets, options, dict(n_buckets=4, key_mask=key_mask)


def _triton(qk, v, buckets, options, call):
    return lsh_attention(qk, v, buckets, options.replace(attn_backend="triton"), **call)


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_equal_chunked_and_reference(case):
    qk, v, buckets, options, call = _case(*case)
    out, attn = _triton(qk, v, buckets, options, call)
    assert attn is None
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qk, v), grad)
    expected = lsh_attention_chunked(qk, v, buckets, options, **call)[0]
    expected_grads = torch.autograd.grad(expected, (qk, v), grad)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    reference = lsh_attention_reference(qk.detach().double(), v.detach().double(), buckets, options, **call)[0]
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=0)


def test_head_dims_64_and_128():
    for d in (64, 128):
        qk, v, buckets, options, call = _case(True, True, True, True, 2, 32, 16, d=d)
        out = _triton(qk, v, buckets, options, call)[0]
        torch.testing.assert_close(out, lsh_attention_chunked(qk, v, buckets, options, **call)[0], atol=1e-5, rtol=0)
