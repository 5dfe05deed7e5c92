"""The chunked LM loss (reformer.loss): equal to cross-entropy on the full logits, in value and
gradients, while the head only ever sees one chunk of positions."""

import pytest
import torch
import torch.nn.functional as F

from reformer import ReformerLM
from reformer.loss import chunked_cross_entropy, default_chunk_size


def _lm(**overrides):
    torch.manual_seed(0)
    options = dict(num_tokens=37, dim=32, depth=2, heads=2, bucket_size=8, n_hashes=2, max_seq_len=64, causal=True)
    return ReformerLM(**{**options, **overrides}).eval()


def _targets(tokens: torch.Tensor) -> torch.Tensor:
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100  # the last position has nothing to predict
    targets[0, :5] = -100  # and some rows are not scored
    return targets


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("chunk", [1, 7, 40, 10_000])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"weight_tie_embedding": True}, {"emb_dim": 16}, {"reverse_thres": 10_000}],
    ids=["untied", "tied", "emb_dim", "not_reversible"],
)
def test_chunked_loss_equals_full_cross_entropy_and_its_gradients(chunk, overrides):
    model = _lm(**overrides)
    tokens = torch.randint(0, 37, (3, 41))
    targets = _targets(tokens)

    expected = F.cross_entropy(model(tokens).transpose(1, 2), targets, ignore_index=-100)
    expected.backward()
    expected_grads = _grads(model)

    loss = model(tokens, targets=targets, loss_chunk_size=chunk)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    grads = _grads(model)
    assert len(grads) == len(expected_grads) > 0
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_loss_in_training_mode_replays_the_same_rotations():
    model = _lm(lsh_dropout=0.0).train()
    tokens = torch.randint(0, 37, (2, 33))
    targets = _targets(tokens)
    torch.manual_seed(5)
    expected = F.cross_entropy(model(tokens).transpose(1, 2), targets, ignore_index=-100)
    expected.backward()
    expected_grads = _grads(model)
    torch.manual_seed(5)
    loss = model(tokens, targets=targets, loss_chunk_size=9)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(model), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_head_never_sees_more_than_one_chunk_forward_or_backward():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    seen = []
    hidden = torch.randn(2, 30, 8, requires_grad=True)
    targets = torch.randint(0, 50, (2, 30))

    def recording_head(rows):
        seen.append(rows.shape[0])
        return head(rows)

    loss = chunked_cross_entropy(hidden, recording_head, targets, chunk_size=16)
    forward_calls = list(seen)
    loss.backward()
    assert forward_calls == [16, 16, 16, 12]  # 60 positions
    assert sorted(seen[4:]) == [12, 16, 16, 16]  # each chunk's logits recomputed alone in the backward
    full = F.cross_entropy(head(hidden.detach()).reshape(-1, 50), targets.reshape(-1))
    torch.testing.assert_close(loss, full)


def test_without_grad_nothing_is_recomputed_and_the_value_is_the_same():
    model = _lm()
    tokens = torch.randint(0, 37, (2, 20))
    targets = _targets(tokens)
    with torch.no_grad():
        expected = F.cross_entropy(model(tokens).transpose(1, 2), targets, ignore_index=-100)
        torch.testing.assert_close(model(tokens, targets=targets, loss_chunk_size=3), expected)


def test_default_chunk_holds_about_sixteen_million_logits():
    assert default_chunk_size(256) == 65536
    assert default_chunk_size(32768) == 512
    assert default_chunk_size(10**8) == 1


@pytest.mark.parametrize(
    "targets, chunk, message",
    [
        (torch.zeros(2, 9, dtype=torch.long), None, "targets must have the shape of tokens"),
        (torch.zeros(2, 10), None, "targets must be an integer tensor"),
        (torch.zeros(2, 10, dtype=torch.long), 0, "loss_chunk_size must be an integer >= 1"),
        (torch.zeros(2, 10, dtype=torch.long), 2.5, "loss_chunk_size must be an integer >= 1"),
    ],
)
def test_bad_targets_and_chunk_sizes_are_refused_by_name(targets, chunk, message):
    with pytest.raises(ValueError, match=message):
        _lm()(torch.zeros(2, 10, dtype=torch.long), targets=targets, loss_chunk_size=chunk)


def test_targets_need_logits():
    with pytest.raises(ValueError, match="return_embeddings"):
        _lm(return_embeddings=True)(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_integer_tokens_and_targets_work_as_int64_ones(dtype):
    model = _lm()
    tokens = torch.randint(0, 37, (2, 12))
    targets = tokens.roll(-1, dims=1)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens.to(dtype)), model(tokens))
        torch.testing.assert_close(model(tokens.to(dtype), targets=targets.to(dtype)), model(tokens, targets=targets))
