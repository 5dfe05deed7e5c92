"""One process of the distributed tests: ``python -m torch.distributed.run ... ddp_worker.py SPEC``
trains a tiny model on the built-in corpus with :func:`reformer.train.train`; ``SPEC`` is JSON
with ``model`` and ``train`` keyword arguments, ``out``, and optional ``resume`` / ``stop_after``.
The tests also call :func:`run` in-process for the one-process reference."""

import json
import sys

import torch

from reformer import ReformerLM, distributed
from reformer.data import load_corpus
from reformer.train import TrainConfig, train


def run(spec: dict) -> None:
    distributed.setup("cpu", timeout_s=60)
    try:
        corpus = load_corpus("builtin")
        torch.manual_seed(0)
        model = ReformerLM(**spec["model"])
        train(model, corpus.train, corpus.valid, TrainConfig(**spec["train"]), spec["out"],
              resume=spec.get("resume", False), stop_after=spec.get("stop_after"))  # fmt: skip
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
