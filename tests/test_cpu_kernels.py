"""The fused CPU row kernels (reformer/native/kernels.c) against the torch ops they
replace, and the chunked path with them against the reference and against itself without them."""

import platform
import shutil

import pytest
import torch
from builders import tied_projections

from reformer.attention import chunked, slots, window_plan
from reformer.attention.chunked import lsh_attention_chunked
from reformer.attention.common import masked_value
from reformer.attention.options import LSHOptions
from reformer.attention.reference import lsh_attention_reference
from reformer.attention.slots import CpuKernels
from reformer.attention.window_plan import WindowPlan, strict_hidden_table
from reformer.attention.window_torch import BlockGrads, TorchWindows
from reformer.native import kernels as cpu_kernels

SELF = -5e4


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.delenv("REFORMER_CPU_KERNELS", raising=False)
    if shutil.which("cc") is None:
        pytest.skip("no C compiler here: the chunked path runs its torch ops only")
    assert cpu_kernels.available(torch.zeros(1), 96, 128), "the kernels must build where a compiler exists"


def _strict_eager(dots, span_row, c, s, exp_lse):
    """The torch path: table mask, own-key logit, softmax (or exp(x - lse)) and lse."""
    hidden = strict_hidden_table(c, s, dots.device).index_select(0, span_row).view_as(dots)
    x = dots.masked_fill(hidden, masked_value(dots.dtype))
    x.view(x.shape[0], -1)[:, c :: c + s + 1] = SELF
    lse = torch.logsumexp(x.double(), -1)
    probs = torch.exp(x.double() - lse[..., None]) if exp_lse else torch.softmax(x.double(), -1)
    return probs.float(), lse.float()


@pytest.mark.parametrize("c,s", [(64, 32), (6, 3), (7, 7), (4, 2)])
@pytest.mark.parametrize("exp_lse", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_strict_softmax_equals_table_mask_and_softmax(c, s, exp_lse, in_place):
    blk = 5
    dots = torch.randn(blk, s, c + s) * 4
    span = torch.randint(0, c + 1, (blk * s,))
    span[:3] = torch.tensor([0, c, 1])  # only its own key; the most keys; one more
    span_row = span * s + torch.arange(blk * s) % s
    probs = dots.clone() if in_place else torch.empty_like(dots)
    lse = cpu_kernels.strict_softmax(probs if in_place else dots, probs, span_row, s, c, SELF, exp_lse)
    ref_probs, ref_lse = _strict_eager(dots, span_row, c, s, exp_lse)
    torch.testing.assert_close(probs, ref_probs, atol=3e-7, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=1e-6)
    hidden = ref_probs == 0
    assert (probs[hidden] == 0).all()  # hidden keys get exactly 0
    assert probs.view(-1, c + s)[0, c] == 1 and lse.view(-1)[0] == SELF  # self only: weight 1, lse exact


@pytest.mark.parametrize("exp_lse", [False, True])
def test_softmax_of_masked_rows_equals_torch(exp_lse):
    dots = torch.randn(3, 8, 21) * 10
    dots[torch.rand(3, 8, 21) > 0.6] = masked_value(torch.float32)
    dots[:, :, 4] = 30.0  # an entry every row sees
    probs = torch.empty_like(dots)
    lse = cpu_kernels.softmax(dots, probs, exp_lse)
    torch.testing.assert_close(probs, torch.softmax(dots.double(), -1).float(), atol=3e-7, rtol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(dots.double(), -1).float(), atol=0, rtol=1e-6)


def test_exp_is_accurate_over_the_range_where_fp32_is_normal():
    # One visible row per value: softmax over (x, 0) is exp(x) / (1 + exp(x)); x spans [-87, 0].
    x = torch.linspace(-87, 0, 4001)
    dots = torch.stack([x, torch.zeros_like(x)], -1)[:, None]  # (4001, 1, 2)
    probs = torch.empty_like(dots)
    cpu_kernels.softmax(dots, probs, False)
    exact = torch.sigmoid(x.double())
    torch.testing.assert_close(probs[:, 0, 0].double(), exact, atol=0, rtol=4e-7)


@pytest.mark.parametrize("strict", [False, True])
def test_softmax_backward_equals_torch(strict):
    c, s = 8, 4
    grad, probs, shift = torch.randn(6, s, c + s), torch.rand(6, s, c + s), torch.randn(6, s, 1)
    expected = (grad - shift) * probs
    if strict:
        expected.view(6, -1)[:, c :: c + s + 1] = 0
    cpu_kernels.softmax_backward_(grad, probs, shift, c, strict)
    torch.testing.assert_close(grad, expected, atol=0, rtol=0)


def test_gather_rows_equals_index_select():
    x = torch.randn(500, 37)
    rows = torch.randint(0, 500, (3, 41))
    assert torch.equal(cpu_kernels.gather_rows(x, rows), x.index_select(0, rows.flatten()).view(3, 41, 37))


@pytest.mark.parametrize("nb,m,c,s", [(1, 7, 8, 4), (3, 2, 6, 6), (2, 5, 4, 2)])
def test_window_grads_to_rows_equals_the_torch_path_bit_for_bit(monkeypatch, nb, m, c, s):
    d, dv, rows_total = 5, 3, 40
    plan = WindowPlan(
        c=c, s=s, lp=0, slot_row=torch.zeros(1, 1), ext_row=torch.zeros(1, 1), round_slot=torch.zeros(1),
        strict=False, span_row=None, slot_pos=None, slot_group=None, causal=False, key_valid=None, dup_info=None,
    )  # fmt: skip
    run = torch.empty(nb, m * s + c, 2 * d + dv)
    key_rows = torch.randint(0, rows_total, (nb, m * s + c))  # repeats included
    gq, gk, gv = torch.randn(nb * m, s, d), torch.randn(nb * m, c + s, d), torch.randn(nb * m, c + s, dv)
    start = torch.randn(rows_total, 2 * d + dv)
    torch_path, fused = start.clone(), start.clone()
    TorchWindows(plan, d, dv).add_block_grads(torch_path, key_rows, run, BlockGrads(gq, gk, gv))
    cpu_kernels.window_grads_to_rows_(fused, key_rows, gq, gk, gv, s, c)
    assert torch.equal(fused, torch_path)


MODES = [
    dict(causal=True),
    dict(causal=True, strict_causal=False),
    dict(causal=False),
    dict(causal=True, allow_duplicate_attention=False),
    dict(causal=False, attend_across_buckets=False),
    dict(causal=True, exp_lse_softmax=True, self_attn_value=-1e5),
]


@pytest.mark.parametrize("kw", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_with_kernels_equals_reference_with_gradients(monkeypatch, kw, masked):
    monkeypatch.setattr(window_plan, "WINDOW_BLOCK_ELEMENTS", 300)
    qk, v = torch.randn(2, 77, 16), torch.randn(2, 77, 8)
    buckets = torch.randint(0, 4, (2, 3, 77))
    key_mask = torch.rand(2, 77) > 0.2 if masked else None
    options = LSHOptions(bucket_size=8, **kw)

    def run(fn, dtype):
        a, b = qk.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
        out, _ = fn(a, b, buckets, options, n_buckets=4, key_mask=key_mask)
        weight = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        return (out, *torch.autograd.grad((out * weight).sum(), (a, b)))

    calls = []
    gather = cpu_kernels.gather_rows
    monkeypatch.setattr(cpu_kernels, "gather_rows", lambda *a: calls.append(1) or gather(*a))
    fused = run(lsh_attention_chunked, torch.float32)
    assert calls, "the fp32 CPU path must use the kernels"
    # (the reference has softmax weights and the default own-key logit only)
    reference = None if "exp_lse_softmax" in kw else run(lsh_attention_reference, torch.float64)
    monkeypatch.setenv("REFORMER_CPU_KERNELS", "0")
    torch_ops = run(lsh_attention_chunked, torch.float32)
    for i, (a, c) in enumerate(zip(fused, torch_ops, strict=True)):
        torch.testing.assert_close(a, c, atol=2e-6, rtol=0)
        if reference is not None:
            torch.testing.assert_close(a.double(), reference[i], atol=2e-5, rtol=0)


@pytest.mark.parametrize("block_elements", [3000, 2**18])  # several blocks per batch row; whole rows per block
@pytest.mark.parametrize("c,d,dv", [(32, 16, 16), (64, 32, 48)])
def test_fused_window_kernels_equal_the_reference_and_the_unfused_path(monkeypatch, block_elements, c, d, dv):
    _check_fused_windows(monkeypatch, block_elements, c, d, dv)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector extensions")
def test_fused_window_kernels_built_without_avx512_agree_too(monkeypatch, tmp_path):
    # Their register tiles differ with the vector width: check the AVX build here as well
    # (on a machine without AVX-512 the test above already runs it).
    monkeypatch.setattr(cpu_kernels, "FLAGS", [*cpu_kernels.FLAGS, "-mno-avx512f"])
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        _check_fused_windows(monkeypatch, 3000, 64, 32, 48)
        assert list((tmp_path / "kernels").glob("*.so")), "the AVX build must have been the one used"
    finally:
        cpu_kernels._library.cache_clear()


def test_fused_backward_after_the_unfused_exp_lse_forward_equals_the_unfused_path(monkeypatch):
    # exp_lse weights the rounds by exp(lse), which the fused forward does not do; the backward
    # takes the weights as computed, so it stays fused
    _check_fused_windows(monkeypatch, 3000, 32, 16, 16, exp_lse=True)


def _check_fused_windows(monkeypatch, block_elements: int, c: int, d: int, dv: int, exp_lse: bool = False) -> None:
    monkeypatch.setattr(window_plan, "WINDOW_BLOCK_ELEMENTS", block_elements)
    length, rounds = 8 * c, 3
    qk, v = torch.randn(2, length, d) * 3, torch.randn(2, length, dv)
    buckets = torch.randint(0, 8, (2, rounds, length))
    options = LSHOptions(bucket_size=c, causal=True, exp_lse_softmax=exp_lse)
    calls = []
    for name in ("strict_windows_forward_", "strict_windows_backward_"):
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))

    def run(fn, dtype):
        a, b = qk.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
        out, _ = fn(a, b, buckets, options, n_buckets=8)
        weight = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        return (out, *torch.autograd.grad((out * weight).sum(), (a, b)))

    fused = run(lsh_attention_chunked, torch.float32)
    assert set(calls) == (
        {"strict_windows_backward_"} if exp_lse else {"strict_windows_forward_", "strict_windows_backward_"}
    )
    with torch.no_grad():  # (probabilities not kept: the forward writes them to a scratch block)
        torch.testing.assert_close(lsh_attention_chunked(qk, v, buckets, options, n_buckets=8)[0], fused[0],
                                   atol=0, rtol=0)  # fmt: skip
    # (the reference has softmax round weights only)
    reference = [None] * 3 if exp_lse else run(lsh_attention_reference, torch.float64)
    monkeypatch.setattr(cpu_kernels, "window_tiles_fit", lambda *a: False)
    unfused = run(lsh_attention_chunked, torch.float32)
    for a, b, r in zip(fused, unfused, reference, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
        if r is not None:
            torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "kw,c,dv,fused",
    [
        (dict(causal=True), 32, 16, True),
        (dict(causal=True), 16, 16, False),  # 24-key windows: not a multiple of the tiles' 16 columns
        (dict(causal=True), 32, 8, False),
        (dict(causal=True, strict_causal=False), 32, 16, False),
        (dict(causal=False), 32, 16, False),
        (dict(causal=True, allow_duplicate_attention=False), 32, 16, False),
        (dict(causal=True, key_mask=torch.ones(1, 64, dtype=torch.bool)), 32, 16, False),
        (dict(causal=True, attn_mask=torch.ones(1, 64, 64, dtype=torch.bool)), 32, 16, False),
    ],
)
def test_which_windows_the_fused_kernels_take(monkeypatch, kw, c, dv, fused):
    calls = []
    kernel = cpu_kernels.strict_windows_forward_
    monkeypatch.setattr(cpu_kernels, "strict_windows_forward_", lambda *a: calls.append(1) or kernel(*a))
    qk, v = torch.randn(1, 64, 16), torch.randn(1, 64, dv)
    call = {name: x for name, x in kw.items() if name in ("key_mask", "attn_mask")}
    options = LSHOptions(bucket_size=c, **{name: x for name, x in kw.items() if name not in call})
    lsh_attention_chunked(qk, v, torch.randint(0, 2, (1, 2, 64)), options, n_buckets=2, **call)
    assert bool(calls) == fused


KERNELS = ["bucket_sort", "pack_qkv_", "gather_rows", "strict_softmax", "softmax", "softmax_backward_",
           "window_grads_to_rows_", "accumulate_rounds_", "finish_rounds_", "fold_qk_grad_",
           "strict_windows_forward_", "strict_windows_backward_"]  # fmt: skip


@pytest.mark.parametrize("decision", [CpuKernels(sort=False, windows=False), CpuKernels(sort=True, windows=False)])
@pytest.mark.parametrize("causal,key_mask", [(True, None), (False, torch.rand(2, 64) > 0.2)])
def test_the_calls_one_kernel_decision_governs_every_step(monkeypatch, decision, causal, key_mask):
    # The kernels could serve here (fp32 on CPU, and fused windows for causal=True); the call's
    # one decision turns them off, and no step (sort, plan, windows, backward) decides again.
    monkeypatch.setattr(chunked, "cpu_kernels_for", lambda *a: decision)
    used = []
    for name in KERNELS:
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, kernel=kernel, name=name: used.append(name) or kernel(*a))
    qk, v = torch.randn(2, 64, 16, requires_grad=True), torch.randn(2, 64, 16, requires_grad=True)
    buckets = torch.randint(0, 4, (2, 2, 64))
    options = LSHOptions(bucket_size=32, causal=causal)
    out, _ = lsh_attention_chunked(qk, v, buckets, options, n_buckets=4, key_mask=key_mask)
    out.square().sum().backward()
    assert set(used) == ({"bucket_sort"} if decision.sort else set())
    monkeypatch.setattr(chunked, "cpu_kernels_for", slots.cpu_kernels_for)  # the kernels serve: same result
    qk2, v2 = qk.detach().requires_grad_(), v.detach().requires_grad_()
    out2, _ = lsh_attention_chunked(qk2, v2, buckets, options, n_buckets=4, key_mask=key_mask)
    out2.square().sum().backward()
    assert "gather_rows" in used or "strict_windows_forward_" in used
    torch.testing.assert_close(out2, out, atol=2e-6, rtol=0)
    torch.testing.assert_close(qk2.grad, qk.grad, atol=2e-5, rtol=0)


def test_dropout_with_kernels_equals_torch_ops(monkeypatch):
    qk, v = torch.randn(2, 64, 8, requires_grad=True), torch.randn(2, 64, 8, requires_grad=True)
    buckets = torch.randint(0, 4, (2, 2, 64))

    def run():
        torch.manual_seed(5)
        options = LSHOptions(bucket_size=8, causal=True, lsh_dropout=0.3)
        out, _ = lsh_attention_chunked(qk, v, buckets, options, n_buckets=4, training=True)
        return (out, *torch.autograd.grad(out.square().sum(), (qk, v)))

    fused = run()
    monkeypatch.setenv("REFORMER_CPU_KERNELS", "0")
    for a, b in zip(fused, run(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


def test_library_is_built_once_into_the_cache_with_no_partial_file(monkeypatch, tmp_path):
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        assert cpu_kernels.available(torch.zeros(1), 96, 128)
        built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].startswith("kernels-") and built[0].endswith(".so")
    finally:
        cpu_kernels._library.cache_clear()


def test_without_a_compiler_the_torch_ops_serve(monkeypatch, tmp_path):
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu_kernels._library.cache_clear()
    try:
        assert not cpu_kernels.available(torch.zeros(1), 96, 128)
        qk, v = torch.randn(1, 40, 8), torch.randn(1, 40, 8)
        buckets = torch.randint(0, 4, (1, 2, 40))
        options = LSHOptions(bucket_size=8, causal=True)
        out, _ = lsh_attention_chunked(qk, v, buckets, options, n_buckets=4)
        ref, _ = lsh_attention_reference(qk, v, buckets, options, n_buckets=4)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())
    finally:
        cpu_kernels._library.cache_clear()


@pytest.mark.parametrize("dtype,width,features", [(torch.bfloat16, 96, 128), (torch.float32, 5000, 128),
                                                  (torch.float32, 96, 5000)])  # fmt: skip
def test_not_available_outside_what_the_kernels_take(dtype, width, features):
    assert not cpu_kernels.available(torch.zeros(1, dtype=dtype), width, features)


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("REFORMER_CPU_KERNELS", "0")
    assert not cpu_kernels.available(torch.zeros(1), 96, 128)


@pytest.mark.parametrize("r", [8, 13, 128])
def test_argmax_both_signs_equals_argmax_with_ties_zeros_and_nan(r):
    part = tied_projections(300, r)
    expected = torch.cat([part, -part], dim=-1).argmax(dim=-1)
    got = cpu_kernels.argmax_both_signs(part)
    finite = ~part.isnan().any(-1)
    assert torch.equal(got[finite], expected[finite])
    assert got.min() >= 0 and got.max() < 2 * r
    wide = torch.randn(4, 50, 2 * r)  # a slice of the last dim, as factorised buckets hash
    second = wide[..., r:]
    assert torch.equal(cpu_kernels.argmax_both_signs(second), torch.cat([second, -second], -1).argmax(-1))


def test_bucket_sort_equals_sorting_by_bucket_then_position():
    n = 777
    ids = torch.randint(0, 9, (2, 3, n))
    ids[0, 0, -50:] = 9  # the id that padding gets sorts last
    perm, inv, sorted_ids = cpu_kernels.bucket_sort(ids, 10)
    keys, expected = (ids * n + torch.arange(n)).sort(dim=-1)
    assert torch.equal(perm, expected) and torch.equal(sorted_ids, keys // n)
    assert torch.equal(inv.gather(-1, perm), torch.arange(n).expand(2, 3, n))
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        cpu_kernels.bucket_sort(ids, 9)


@pytest.mark.parametrize("n_buckets", [64, (8, 8)])
def test_hashing_with_the_kernel_equals_torch_ops(monkeypatch, n_buckets):
    from reformer.hashing import draw_rotations, hash_vectors

    x = torch.randn(6, 300, 16)
    rotations = draw_rotations(16, 3, n_buckets, n_sets=2, seed=0)
    fused = hash_vectors(x, rotations, n_buckets)
    monkeypatch.setenv("REFORMER_CPU_KERNELS", "0")
    assert torch.equal(fused, hash_vectors(x, rotations, n_buckets))
