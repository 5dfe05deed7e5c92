"""Stability: a long run of training steps holds its memory flat; the same seed gives the same
losses."""

import gc
import resource

import torch

from reformer import ReformerLM
from reformer.data import load_corpus
from reformer.train import TrainConfig, train


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_a_thousand_training_steps_do_not_grow_memory():
    torch.manual_seed(0)
    model = ReformerLM(num_tokens=64, dim=32, depth=2, heads=2, bucket_size=8, n_hashes=2, max_seq_len=64,
                       causal=True, lsh_dropout=0.1, ff_dropout=0.1)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (2, 64))
    readings = {}
    for step in range(1, 1001):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:])
        loss.backward()  # reversible blocks (the default for training)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (200, 1000):
            gc.collect()
            readings[step] = _rss_mb()
    # A leaked graph or activation per step would be >= 60 KB x 800 steps.
    assert readings[1000] - readings[200] < 8, readings
    assert torch.isfinite(loss)


def test_the_same_seed_gives_the_same_losses(tmp_path, tiny_lm):
    corpus = load_corpus("builtin")
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=64, eval_every=3, eval_batches=1, save_every=100, seed=5)
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        model = tiny_lm(lsh_dropout=0.1)
        runs.append(train(model, corpus.train, corpus.valid, cfg, tmp_path / name).history)
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]
    assert [r.get("eval_loss") for r in runs[0]] == [r.get("eval_loss") for r in runs[1]]
