import math

import pytest
import torch

import reformer.train as train_mod
from reformer import ReformerLM
from reformer.data import load_corpus
from reformer.train import TrainConfig, TrainingDiverged, checkpoint_dirs, lr_factor, train


def _model():
    torch.manual_seed(0)
    return ReformerLM(num_tokens=256, dim=32, depth=2, heads=2, bucket_size=16, n_hashes=2, max_seq_len=128,
                      causal=True, lsh_dropout=0.1)  # fmt: skip


def _cfg(**kw):
    base = dict(steps=20, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=5, eval_every=10, eval_batches=2,
                save_every=5, keep_last=2)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("builtin")


def test_twenty_steps_on_the_builtin_corpus_lower_the_loss(tmp_path, corpus):
    state = train(_model(), corpus.train, corpus.valid, _cfg(), tmp_path)
    losses = [r["loss"] for r in state.history]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    evals = [r["eval_bpc"] for r in state.history if "eval_bpc" in r]
    assert len(evals) == 2 and evals[-1] < 8.0  # below uniform over bytes
    assert all(r["tokens_per_s"] > 0 for r in state.history)
    names = [p.name for p in checkpoint_dirs(tmp_path)]
    assert names == ["step-0000015", "step-0000020"]  # keep_last=2, nothing half-written
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16: the loss scale is resumed too
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, corpus, precision):
    cfg = _cfg(steps=8, save_every=100, eval_every=4, precision=precision)
    straight = train(_model(), corpus.train, corpus.valid, cfg, tmp_path / "a")
    first = train(_model(), corpus.train, corpus.valid, cfg, tmp_path / "b", stop_after=3)
    assert first.step == 3
    resumed = train(_model(), corpus.train, corpus.valid, cfg, tmp_path / "b", resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert resumed.history[-1]["eval_loss"] == straight.history[-1]["eval_loss"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    real = train_mod.lm_loss
    calls = {"n": 0}

    def flaky(model, batch, precision, scored=None):
        calls["n"] += 1
        loss = real(model, batch, precision, scored)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(train_mod, "lm_loss", flaky)
    with pytest.raises(TrainingDiverged, match="at step 7"):
        train(_model(), corpus.train, corpus.valid, _cfg(save_every=5), tmp_path)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000005"]


def test_learning_rate_schedules():
    cfg = TrainConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=1e-3)
    rsqrt = TrainConfig(steps=100, warmup_steps=16, schedule="rsqrt")
    assert lr_factor(63, rsqrt) == pytest.approx(math.sqrt(16 / 64))
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def test_validation_split_too_short_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(ValueError, match="too few"):
        train(_model(), corpus.train, corpus.valid[:50], _cfg(), tmp_path)


def test_bf16_training_runs(tmp_path, corpus):
    state = train(_model(), corpus.train, corpus.valid, _cfg(steps=4, precision="bf16"), tmp_path)
    assert all(math.isfinite(r["loss"]) for r in state.history)


def test_duplication_task_trains_with_loss_only_on_the_second_copy(tmp_path):
    from reformer.data import DuplicationTask
    from reformer.train import lm_loss

    model = _model()
    task = DuplicationTask(seq_len=64, batch_size=3, n_symbols=255, seed=0)
    tokens, scored = task.next_batch()
    model.eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        expected = torch.nn.functional.cross_entropy(logits[:, 32:].reshape(-1, 256), tokens[:, 33:].reshape(-1))
        # exactly the targets of the second copy (positions 33..63) count
        torch.testing.assert_close(lm_loss(model, tokens, "fp32", scored), expected)
        assert not torch.allclose(lm_loss(model, tokens, "fp32"), expected)
    state = train(model, task, task, _cfg(steps=4, seq_len=63, eval_every=2), tmp_path)
    assert all(math.isfinite(r["loss"]) for r in state.history)
