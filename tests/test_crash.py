"""Crash safety: training killed with SIGKILL at random moments always leaves a loadable latest
checkpoint and resumes from it; a failing write keeps the previous checkpoint; fp16 gradient
overflow is caught and reported."""

import csv
import random
import subprocess
import sys
import time

import pytest
import torch
from builders import tiny_lm

import reformer.train as train_mod
from reformer import ReformerLM
from reformer.checkpoint import verify_manifest
from reformer.cli import main
from reformer.data import load_corpus
from reformer.train import TrainConfig, checkpoint_dirs, train

TRAIN = ["train", "--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--eval-every", "1000"]


def _assert_loadable(checkpoint):
    verify_manifest(checkpoint)
    ReformerLM.from_pretrained(checkpoint)
    assert torch.load(checkpoint / "trainer.pt", weights_only=True)["step"] == int(checkpoint.name[5:])


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(0)
    base = [sys.executable, "-m", "reformer.cli", *TRAIN, "--save-every", "1", "--out", str(run)]
    command = [*base, "--steps", "100000"]
    steps = []
    for trial in range(4):
        proc = subprocess.Popen(command + (["--resume"] if trial else []), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        before = checkpoint_dirs(run)[-1].name if checkpoint_dirs(run) else None
        while (not checkpoint_dirs(run) or checkpoint_dirs(run)[-1].name == before) and time.monotonic() < deadline:
            time.sleep(0.05)  # until this process has written a checkpoint of its own
        time.sleep(rng.uniform(0.0, 1.0))  # then anywhere: mid-step or mid-write
        proc.kill()
        proc.wait(timeout=30)
        latest = checkpoint_dirs(run)[-1]
        _assert_loadable(latest)
        steps.append(int(latest.name[5:]))
    assert steps == sorted(steps) and steps[-1] > steps[0]  # every resume went on from the latest

    final = steps[-1] + 2
    done = subprocess.run([*base, "--steps", str(final), "--resume", "--allow-change"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"finished step {final}" in done.stdout
    assert not list((run / "checkpoints").glob(".tmp-*"))  # what a kill left half-written is gone
    with (run / "log.csv").open() as f:
        logged = [int(row["step"]) for row in csv.DictReader(f)]
    assert logged == list(range(1, final + 1))  # steps redone after a kill are logged once


def _tiny_model():
    torch.manual_seed(0)
    return tiny_lm()


def test_a_failing_write_keeps_the_previous_checkpoint_and_reports(tmp_path, monkeypatch):
    corpus = load_corpus("builtin")
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=64, eval_every=100, eval_batches=1, save_every=2)
    real_save, calls = torch.save, {"n": 0}

    def disk_full(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write part of it, then fail
            open(path, "wb").write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_mod.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(_tiny_model(), corpus.train, corpus.valid, cfg, tmp_path)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    _assert_loadable(checkpoint_dirs(tmp_path)[0])
    calls["n"] = 0
    code = main([*TRAIN, "--steps", "4", "--save-every", "2", "--out", str(tmp_path / "cli")])
    assert code == 2  # a one-line error, as for every other failure


def test_a_corrupt_latest_checkpoint_is_named_when_resuming(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN, "--steps", "2", "--save-every", "2", "--out", str(run)]) == 0
    trainer = checkpoint_dirs(run)[-1] / "trainer.pt"
    data = bytearray(trainer.read_bytes())
    data[len(data) // 2] ^= 1
    trainer.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*TRAIN, "--steps", "4", "--out", str(run), "--resume"]) == 2
    assert "trainer.pt does not match its checksum" in capsys.readouterr().err


def test_fp16_gradient_overflow_is_skipped_and_reported(tmp_path, monkeypatch):
    corpus = load_corpus("builtin")
    real, calls = train_mod.lm_loss, {"n": 0}

    def huge_at_third(model, batch, precision, scored=None):
        calls["n"] += 1
        loss = real(model, batch, precision, scored)
        return loss * 1e35 if calls["n"] == 3 else loss  # finite loss, gradients overflow once scaled

    monkeypatch.setattr(train_mod, "lm_loss", huge_at_third)
    cfg = TrainConfig(steps=5, batch_size=2, seq_len=64, eval_every=100, eval_batches=1, save_every=100,
                      precision="fp16")  # fmt: skip
    model = _tiny_model()
    history = train(model, corpus.train, corpus.valid, cfg, tmp_path).history
    assert [bool(r.get("overflow")) for r in history] == [False, False, True, False, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update never landed
    saved = torch.load(checkpoint_dirs(tmp_path)[-1] / "trainer.pt", weights_only=True)
    assert saved["grad_scaler"]["scale"] == 2.0**15  # halved once, and resumed from there
