"""Rank 0's report of a training run: progress bar, ``log.csv``, TensorBoard, ``loss.png``."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ..plots import finish_axes, pyplot, save_png
from ..train import TrainState

LN2 = 0.6931471805599453


def plot_losses(history: list[dict], path: Path) -> None:
    """``loss.png``: the training and validation losses by step, in bits (per token for a
    language model: the validation curve is its bpc; per document for a classifier)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["loss"] / LN2 for r in history], label="train", alpha=0.6)
    evals = [r for r in history if "eval_loss" in r]
    ax.plot([r["step"] for r in evals], [r["eval_loss"] / LN2 for r in evals], "o-", label="validation")
    finish_axes(ax, "step", "loss (bits)")
    save_png(fig, path)


class Dashboard:
    """Called after every step with its record: updates the bar, the log, TensorBoard and (at
    each evaluation) the plot."""

    FIELDS = ["step", "loss", "lr", "tokens_per_s", "eval_loss", "eval_bpc", "eval_accuracy", "overflow"]

    def __init__(self, run: Path, steps: int, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.run, self.log_path = run, run / "log.csv"
        # A resumed run redoes the steps after its checkpoint: TensorBoard hides their old events.
        self.board = SummaryWriter(
            log_dir=str(run / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
        )
        self.bar = tqdm(total=steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
        self.history: list[dict] = []  # this session's steps (state.history also has those before a resume)
        self.overflows: list[int] = []  # fp16 steps whose update was skipped

    def __call__(self, record: dict, state: TrainState) -> None:
        self.history.append(record)
        if self.bar.n == 0:
            self.bar.update(record["step"] - 1)
        self.bar.update(1)
        post = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
        if "eval_bpc" in record:
            post["val_bpc"] = f"{record['eval_bpc']:.3f}"
        if "eval_accuracy" in record:
            post["val_acc"] = f"{record['eval_accuracy']:.1%}"
        self.bar.set_postfix(post)
        if "eval_loss" in record:  # the curve is redrawn at each evaluation
            plot_losses(state.history, self.run / "loss.png")
        for key in self.FIELDS[1:]:
            if key in record:
                self.board.add_scalar(key, record[key], record["step"])
        if record.get("overflow"):
            self.overflows.append(record["step"])
            self.bar.write(f"step {record['step']}: fp16 gradient overflow; update skipped, loss scale lowered")
        # This session's first step rewrites the log from the checkpoint's history, so the steps a
        # killed run logged after its last checkpoint (and that are now redone) appear once.
        first = len(self.history) == 1
        with self.log_path.open("w" if first else "a", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            if first:
                writer.writeheader()
            writer.writerows(state.history if first else [record])

    def close(self) -> None:
        self.bar.close()
        self.board.close()
