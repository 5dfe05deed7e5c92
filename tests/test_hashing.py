import pytest
import torch
from builders import tied_projections

from reformer.hashing import buckets_for_length, draw_rotations, hash_vectors, validate_n_buckets
from reformer.native import workers as cpu_workers


def test_bucket_ids_shape_and_range():
    x = torch.randn(3, 50, 16)
    rot = draw_rotations(16, 4, 8)
    b = hash_vectors(x, rot, 8)
    assert b.shape == (3, 4, 50) and b.dtype == torch.int64
    assert b.min() >= 0 and b.max() < 8
    assert len(b.unique()) > 1


def test_hash_is_angular_scale_invariant():
    x = torch.randn(2, 40, 8)
    rot = draw_rotations(8, 3, 16)
    assert torch.equal(hash_vectors(x, rot, 16), hash_vectors(x * 7.5, rot, 16))
    assert torch.equal(hash_vectors(-x, rot, 16), (hash_vectors(x, rot, 16) + 8) % 16)


def test_close_vectors_collide_more_than_far_ones():
    torch.manual_seed(1)
    base = torch.randn(1, 2000, 32)
    near = base + 0.05 * torch.randn_like(base)
    far = torch.randn_like(base)
    rot = draw_rotations(32, 1, 16)
    hb = hash_vectors(base, rot, 16)
    near_rate = (hb == hash_vectors(near, rot, 16)).float().mean()
    far_rate = (hb == hash_vectors(far, rot, 16)).float().mean()
    assert near_rate > 0.8 and far_rate < 0.2


def test_factorised_buckets_are_mixed_radix_of_the_factors():
    x = torch.randn(2, 30, 8)
    rot = draw_rotations(8, 2, (4, 6))  # 2 + 3 projection columns
    assert rot.shape == (1, 8, 2, 5)
    combined = hash_vectors(x, rot, (4, 6))
    b1 = hash_vectors(x, rot[..., :2], 4)
    b2 = hash_vectors(x, rot[..., 2:], 6)
    assert torch.equal(combined, b1 * 6 + b2)
    assert combined.max() < 24
    assert torch.equal(hash_vectors(x, rot, (4, 6), first_major=False), b1 + 4 * b2)  # Hugging Face's order


def test_seeded_rotations_are_reproducible_and_independent_of_global_rng():
    a = draw_rotations(8, 2, 4, seed=123)
    torch.randn(100)
    b = draw_rotations(8, 2, 4, seed=123)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw_rotations(8, 2, 4, seed=124))
    assert not torch.equal(draw_rotations(8, 2, 4), draw_rotations(8, 2, 4))


def test_per_head_rotation_sets_are_used_by_row_modulo_sets():
    x = torch.randn(1, 20, 8).expand(6, -1, -1).contiguous()  # 2 batch x 3 heads, same input
    rot = draw_rotations(8, 2, 8, n_sets=3)
    b = hash_vectors(x, rot, 8).view(2, 3, 2, 20)
    assert torch.equal(b[0], b[1])  # same head, different batch element
    assert not torch.equal(b[0, 0], b[0, 1])  # different heads hash differently
    with pytest.raises(ValueError, match="multiple"):
        hash_vectors(torch.randn(4, 5, 8), rot, 8)


@pytest.mark.parametrize("bad", [3, 0, -2, 1, (4, 5), (), 2.0, True, "8"])
def test_invalid_bucket_counts_are_rejected(bad):
    with pytest.raises(ValueError, match="n_buckets"):
        validate_n_buckets(bad)


def test_bucket_count_for_length():
    assert buckets_for_length(1024, 64) == 16
    assert buckets_for_length(100, 64) == 2
    assert buckets_for_length(64 * 5, 64) == 6


def test_blockwise_hashing_equals_one_shot(monkeypatch):
    import reformer.hashing as hashing

    x = torch.randn(4, 300, 16)
    rot = draw_rotations(16, 3, (4, 8), n_sets=2)
    whole = hash_vectors(x, rot, (4, 8))
    monkeypatch.setattr(hashing, "HASH_BLOCK_ELEMENTS", 1000)  # many small blocks
    assert torch.equal(hash_vectors(x, rot, (4, 8)), whole)
    for workers in (1, 3):  # blocks split among CPU worker threads, or all in place
        monkeypatch.setattr(cpu_workers, "worker_count", lambda workers=workers: workers)
        assert torch.equal(hash_vectors(x, rot, (4, 8)), whole)
    # and the definition: argmax over [xR, -xR] per factor
    proj = torch.einsum("bsld,sdhr->bshlr", x.view(2, 2, 300, 16), rot).reshape(4, 3, 300, 6)
    first = torch.cat([proj[..., :2], -proj[..., :2]], -1).argmax(-1)
    second = torch.cat([proj[..., 2:], -proj[..., 2:]], -1).argmax(-1)
    assert torch.equal(whole, first * 8 + second)


def test_cpu_matching_argmax_equals_argmax_with_ties_zeros_and_nan():
    from reformer.hashing import _argmax_of_both_signs_by_matching

    torch.manual_seed(0)
    part = tied_projections(300, 8)
    expected = torch.cat([part, -part], dim=-1).argmax(dim=-1)
    got = _argmax_of_both_signs_by_matching(part, torch.empty(part.numel()))
    finite = ~part.isnan().any(-1)
    assert torch.equal(got[finite], expected[finite])
    assert got.min() >= 0 and got.max() < 16
    for dtype in (torch.float64, torch.bfloat16):
        p = part[finite].to(dtype)
        assert torch.equal(
            _argmax_of_both_signs_by_matching(p, torch.empty(p.numel())), torch.cat([p, -p], dim=-1).argmax(dim=-1)
        )
