"""``reformer info``: a run's or checkpoint's architecture, step, best validation bpc,
parameter count, vocabulary kind (and a classifier's labels) and config, as JSON."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    i = subparsers.add_parser("info", help="describe a run or checkpoint", formatter_class=fmt)
    i.add_argument("path", help="run or checkpoint directory")
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import read_config, read_vocab_file
    from ..model import ReformerLM
    from ..train import MODEL_CLASSES, load_trainer_state
    from .loading import resolve_checkpoint

    ckpt = resolve_checkpoint(args.path)
    arch, config = read_config(ckpt)
    info = {"checkpoint": str(ckpt), "architecture": arch}
    if (ckpt / "trainer.pt").is_file():
        state = load_trainer_state(ckpt)
        evals = [r["eval_bpc"] for r in state["history"] if "eval_bpc" in r]
        accuracies = [r["eval_accuracy"] for r in state["history"] if "eval_accuracy" in r]
        info.update(step=state["step"], best_eval_bpc=min(evals) if evals else None)
        if accuracies:  # a classifier's or a masked language model's
            info["best_eval_accuracy"] = max(accuracies)
    kind = {cls.__name__: cls for cls in MODEL_CLASSES.values()}.get(arch, ReformerLM)
    with torch.device("meta"):
        info["parameters"] = sum(p.numel() for p in kind(config=config).parameters())
    saved = read_vocab_file(ckpt) or {"kind": "byte"}  # (no vocab.json: the CLI reads bytes)
    info["vocabulary"] = {k: saved[k] for k in ("kind", "labels") if k in saved}
    info["config"] = config.to_dict()
    print(json.dumps(info, indent=2))
    return 0
