"""A non-finite value never travels back in time.

Contract of every attention path: an output whose query sees (with a non-zero weight) a key
whose shared query/key or value is NaN or +-inf is non-finite (NaN), as is the output of the
position holding it; every other output equals the clean run's exactly. Hidden keys - later
positions of a causal layer among them - contribute nothing, not even 0 * NaN."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from reformer import Reformer
from reformer.attention import backends
from reformer.attention.chunked import lsh_attention_chunked
from reformer.attention.decode import DecodingCache
from reformer.attention.dense import DenseSelfAttention
from reformer.attention.full import full_qk_attention, full_qk_attention_sdpa
from reformer.attention.local import BlockLocalAttention, local_attention_chunked
from reformer.attention.options import LSHOptions
from reformer.attention.self_attention import LSHSelfAttention

BAD_VALUES = (float("nan"), float("inf"), -float("inf"))


def _lsh(qk, v, bucket_size=4, n_hashes=2, dtype=torch.float32, key_mask=None, **kw):
    b, length, _ = qk.shape
    buckets = torch.randint(0, 4, (b, n_hashes, length), generator=torch.Generator().manual_seed(3))
    options = LSHOptions(**{"bucket_size": bucket_size, "causal": True, **kw})
    return lsh_attention_chunked(qk.to(dtype), v.to(dtype), buckets, options, n_buckets=4, key_mask=key_mask)[
        0
    ].double()


def _flex(qk, v):
    buckets = torch.randint(0, 4, (qk.shape[0], 2, qk.shape[1]), generator=torch.Generator().manual_seed(3))
    options = LSHOptions(bucket_size=16, causal=True, attn_backend="flex")
    return backends.lsh_attention(qk, v, buckets, options, n_buckets=4)[0]


def _half_masked(length: int) -> torch.Tensor:
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[0, 1] = False
    return mask


PATHS = {
    "lsh-strict-fused-kernel": partial(_lsh, bucket_size=32),  # fp32, dims of 16: one C call per part
    "lsh-strict-row-kernels": lambda qk, v: _lsh(qk, v, key_mask=_half_masked(qk.shape[1])),
    "lsh-strict-torch-fp64": partial(_lsh, dtype=torch.float64),
    "lsh-classic": partial(_lsh, strict_causal=False),
    "lsh-classic-fp64-set-attention": partial(
        _lsh, strict_causal=False, allow_duplicate_attention=False, attend_across_buckets=False, dtype=torch.float64
    ),
    "lsh-strict-exp-lse": partial(_lsh, exp_lse_softmax=True, n_hashes=3),
    "lsh-flex": _flex,
    "local": lambda qk, v: local_attention_chunked(qk, v, window_size=4, causal=True),
    "local-fp64": lambda qk, v: local_attention_chunked(qk.double(), v.double(), window_size=5, causal=True),
    "full": lambda qk, v: full_qk_attention(qk, v, causal=True)[0],
    "full-sdpa": lambda qk, v: full_qk_attention(qk, v, causal=True, need_weights=False)[0],
    "full-sdpa-masked": lambda qk, v: full_qk_attention_sdpa(qk, v, causal=True, key_mask=_half_masked(qk.shape[1])),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("target", ["qk", "v", "both"])
@torch.no_grad()
def test_non_finite_key_or_value_reaches_exactly_the_queries_that_see_it(path, target):
    attend = PATHS[path]
    if path == "lsh-flex":
        probe = torch.zeros(1, 16, 16)
        reason = backends.unavailable_reason("flex", probe, probe, 16)
        if reason is not None:
            pytest.skip(reason)
    gen = torch.Generator().manual_seed(0)
    length = 75
    qk, v = torch.randn(2, length, 16, generator=gen), torch.randn(2, length, 16, generator=gen)
    clean = attend(qk, v)
    for j in (5, 40, 74):
        moved = v.clone()
        moved[:, j] += 10
        sees = (attend(qk, moved) != clean).any(-1)  # (b, L): the outputs that depend on position j
        sees[:, j] = True  # (its own output: its query is the non-finite one)
        for bad in BAD_VALUES:
            dirty_qk, dirty_v = qk.clone(), v.clone()
            if target in ("qk", "both"):
                dirty_qk[:, j, 3] = bad
            if target in ("v", "both"):
                dirty_v[:, j, 7] = bad
            out = attend(dirty_qk, dirty_v)
            assert torch.equal(~out.isfinite().all(-1), sees), (j, bad)
            assert torch.equal(out[~sees], clean[~sees]), (j, bad)
            assert sees[:, :j].sum() == 0  # in particular, nothing earlier


LAYERS = {
    "lsh": lambda: LSHSelfAttention(dim=16, heads=2, bucket_size=4, n_hashes=2, causal=True, n_buckets=8),
    "lsh-local-heads-memory": lambda: LSHSelfAttention(
        dim=16, heads=2, bucket_size=4, n_hashes=2, causal=True, n_buckets=8, n_local_attn_heads=1, num_mem_kv=2
    ),
    "full": lambda: LSHSelfAttention(dim=16, heads=2, causal=True, use_full_attn=True),
    "block-local": lambda: BlockLocalAttention(dim=16, heads=2, chunk_size=4, causal=True),
    "dense-sdpa": lambda: DenseSelfAttention(dim=16, heads=2, causal=True),
    "dense-sdpa-masked": lambda: partial(
        DenseSelfAttention(dim=16, heads=2, causal=True), input_mask=torch.ones(2, 23, dtype=torch.bool)
    ),
    "reformer": lambda: Reformer(dim=16, depth=2, heads=2, bucket_size=4, n_hashes=2, max_seq_len=32, causal=True),
    "reformer-mixed": lambda: Reformer(
        dim=16, depth=3, heads=2, bucket_size=4, max_seq_len=32, causal=True, attn_layers=("local", "lsh", "full")
    ),
}


@pytest.mark.parametrize("layer", LAYERS)
@torch.no_grad()
def test_non_finite_hidden_state_leaves_earlier_outputs_as_they_were(layer):
    torch.manual_seed(0)
    module = LAYERS[layer]()
    if isinstance(module, torch.nn.Module):
        module.eval()
    x = torch.randn(2, 23, 16)
    clean = module(x)
    for j in (0, 9, 22):
        for bad in BAD_VALUES:
            dirty = x.clone()
            dirty[:, j, 2] = bad
            out = module(dirty)
            assert torch.equal(out[:, :j], clean[:, :j]), (j, bad)
            assert not out[:, j].isfinite().all(), (j, bad)


@torch.no_grad()
def test_cached_decoding_after_a_non_finite_position_equals_the_full_forward():
    """Decoding reads stored keys only, but its unfilled LSH ring slots point at position 0: a
    NaN value there must not reach a query that does not see it."""
    torch.manual_seed(0)
    layer = LSHSelfAttention(dim=16, heads=2, bucket_size=4, n_hashes=2, causal=True, n_buckets=8).eval()
    x = torch.randn(2, 30, 16)
    for j in (0, 6):
        dirty = x.clone()
        dirty[:, j, 1] = float("nan")
        full = layer(dirty)
        cache = DecodingCache()
        steps = [layer(dirty[:, :10], cache=cache)]
        cache.advance(10, x.device)  # (the model's bookkeeping: here the layer is called alone)
        for i in range(10, 30):
            cache.reserve(i + 1)
            cache.begin()
            steps.append(layer(dirty[:, i : i + 1], cache=cache))
            cache.advance(1, x.device)
        cached = torch.cat(steps, dim=1)
        finite = full.isfinite()
        assert finite[:, :j].all() and finite[:, j + 1 :].any()  # some later positions do not see j
        assert torch.equal(cached.isfinite(), finite)
        torch.testing.assert_close(cached[finite], full[finite], atol=1e-5, rtol=0)


@pytest.mark.parametrize("look_forward", [0, 1])
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@torch.no_grad()
def test_bidirectional_local_attention_marks_exactly_the_queries_that_see_a_non_finite_key(look_forward, masked):
    """The fused local path zeroes a bad key and marks, per window, the queries that see it: the
    same queries whose outputs a change of that position's value moves (earlier ones too)."""
    gen = torch.Generator().manual_seed(0)
    qk, v = torch.randn(2, 30, 16, generator=gen), torch.randn(2, 30, 16, generator=gen)
    mask = _half_masked(30) if masked else None
    attend = partial(local_attention_chunked, window_size=4, look_forward=look_forward, key_mask=mask)
    clean = attend(qk, v)
    for j in (1, 13, 29):
        moved = v.clone()
        moved[:, j] += 10
        sees = (attend(qk, moved) != clean).any(-1)
        sees[:, j] = True
        dirty = qk.clone()
        dirty[:, j, 3] = float("nan")
        out = attend(dirty, v)
        assert torch.equal(~out.isfinite().all(-1), sees), j
        assert torch.equal(out[~sees], clean[~sees]), j
        assert sees[:, :j].any() or masked  # earlier queries see it (unless it is masked out)


PADDED = {
    "lsh": lambda: LSHSelfAttention(dim=16, heads=2, bucket_size=4, n_hashes=2, n_buckets=8),
    "lsh-local-heads": lambda: LSHSelfAttention(dim=16, heads=2, bucket_size=4, n_buckets=8, n_local_attn_heads=1),
    "full": lambda: LSHSelfAttention(dim=16, heads=2, use_full_attn=True),
    "dense-sdpa": lambda: DenseSelfAttention(dim=16, heads=2),
}


@pytest.mark.parametrize("layer", PADDED)
@torch.no_grad()
def test_non_finite_masked_out_position_reaches_only_itself(layer):
    """Not causal: a position hidden by ``input_mask`` is seen by nobody, however bad its values.
    (In LSH layers its bucket still moves the chunk boundaries of the others: finite, not equal.)"""
    torch.manual_seed(0)
    module = PADDED[layer]().eval()
    x, mask = torch.randn(2, 21, 16), torch.ones(2, 21, dtype=torch.bool)
    mask[:, 4] = False
    clean = module(x, input_mask=mask)
    for bad in BAD_VALUES:
        dirty = x.clone()
        dirty[:, 4] = bad
        out = module(dirty, input_mask=mask)
        others = torch.arange(21) != 4
        assert out[:, others].isfinite().all() and not out[:, 4].isfinite().any(), bad
        if not layer.startswith("lsh"):
            assert torch.equal(out[:, others], clean[:, others]), bad
