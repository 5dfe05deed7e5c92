"""``reformer reproduce listops``: LSH, local-only and dense attention classifying ListOps, Long
Range Arena's task, at one budget that fits 2 CPU cores (docs/listops.md).

Three classifiers of the same width, depth and training budget on the same generated
expressions (:func:`reformer.labelled.load_listops`): the reversible model with LSH attention
(``lsh``), with local attention alone (``local``) and a standard dense Transformer
(``transformer``). Each is one ordinary ``reformer train --task classify`` run directory
(``train-<model>/``, resumed by rerunning the command); the output directory also holds
``config.json`` (never reused for another study) and the results of every finished model:
``listops.json``, ``listops.md`` (beside Long Range Arena's Table 1) and ``listops-curves.png``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .config import ReformerConfig
from .data import LISTOPS_VOCAB
from .heads import ReformerForSequenceClassification
from .labelled import load_labelled
from .reproduce import Progress, _write_text, claim_out_dir, copy_results, train_setting, training_seconds
from .train import TrainConfig, TrainState, checkpoint_dirs, load_trainer_state

LISTOPS_MODELS = ("lsh", "local", "transformer")
#: Long Range Arena (Tay et al., 2020), Table 1: ListOps test accuracy (%), and chance (10 classes).
LRA_TABLE1 = {"Transformer": 36.37, "Reformer": 37.27, "chance": 10.0}
#: Which of ours stands beside which of LRA's rows.
LRA_ROW = {"lsh": "Reformer", "transformer": "Transformer"}
PUBLISHED = ("listops.json", "listops.md", "listops-curves.png")


@dataclass
class ListOpsConfig:
    """The study's settings; defaults are the CPU scale (see :data:`LISTOPS_SCALES`)."""

    seq_len: int = 1024
    """Tokens per expression at most (expressions have ``seq_len // 4`` to ``seq_len`` tokens;
    LRA's have 500 to 2,000)."""
    n_train: int = 16_000
    """Training expressions (and ``n_train // 10`` validation ones; LRA has 96,000 and 2,000)."""
    steps: int = 2000
    """Training steps per model (the same budget for all): 16,000 expressions, one epoch."""
    batch_size: int = 8
    """Expressions per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warm-up, cosine decay)."""
    warmup_steps: int = 200
    """Warm-up steps."""
    eval_every: int = 500
    """Steps between validation points (and checkpoints: resume points); each covers the whole
    validation split."""
    dim: int = 64
    """Model width."""
    depth: int = 4
    """Layers."""
    heads: int = 4
    """Attention heads."""
    bucket_size: int = 64
    """LSH chunk length. The local model's blocks are twice that (``"local"`` layers' chunk);
    being bidirectional, each query sees its own block and the blocks before and after it."""
    n_hashes: int = 2
    """LSH hashing rounds."""
    models: tuple[str, ...] = LISTOPS_MODELS
    """The models of the study (a run may train a subset, see :func:`run_listops`)."""
    seed: int = 0
    """Seeds the models and the batch order (the expressions come from fixed seeds)."""

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        unknown = [m for m in self.models if m not in LISTOPS_MODELS]
        if not self.models or unknown or len(set(self.models)) != len(self.models):
            raise ValueError(f"models must be distinct names among {list(LISTOPS_MODELS)}, got {list(self.models)}")
        if self.seq_len % self.bucket_size:
            raise ValueError(f"seq_len ({self.seq_len}) must be a multiple of bucket_size ({self.bucket_size})")
        for label in self.models:
            self.model_config(label)  # checks the sizes
        self.train_config()

    @property
    def data(self) -> str:
        """The ``--data`` of the runs."""
        return f"listops:{self.n_train}"

    def model_config(self, label: str) -> ReformerConfig:
        """A bidirectional classifier over ListOps' tokens; the same sizes for every label."""
        attention = {
            "lsh": dict(attn_layers=("lsh",), n_hashes=self.n_hashes, pad_bucket=True),
            "local": dict(attn_layers=("local",)),
            "transformer": dict(residual="standard", shared_qk=False, use_full_attn=True),
        }[label]
        return ReformerConfig(**{
            "num_tokens": len(LISTOPS_VOCAB), "dim": self.dim, "depth": self.depth, "heads": self.heads,
            "max_seq_len": self.seq_len, "bucket_size": self.bucket_size, "causal": False, "num_labels": 10,
            "pooling": "mean", **attention,
        })  # fmt: skip

    def train_config(self) -> TrainConfig:
        n_valid = self.n_train // 10
        return TrainConfig(
            steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
            warmup_steps=self.warmup_steps, eval_every=self.eval_every, save_every=self.eval_every, keep_last=1,
            eval_batches=-(-n_valid // self.batch_size), seed=self.seed, objective="classify",
        )  # fmt: skip


#: ``--scale``: ``cpu`` is the proposed 2-core budget (docs/listops.md); ``pilot`` a few minutes
#: per model on short expressions, to check the machinery and that the models learn.
LISTOPS_SCALES = {
    "cpu": ListOpsConfig(),
    "pilot": ListOpsConfig(
        seq_len=128, n_train=1000, steps=60, warmup_steps=10, eval_every=30, bucket_size=32, depth=2
    ),  # fmt: skip
}


def run_listops(cfg: ListOpsConfig, out: Path, device: str = "cpu", only: tuple[str, ...] | None = None,
                progress: Progress | None = None, command: str | None = None) -> dict:  # fmt: skip
    """Train (or resume) the models of ``only`` (default: all of ``cfg.models``) in ``out`` and
    write the results of every model of the study finished so far, with ``command`` (the command
    line that reproduces the study, when it ran from one)."""
    only = cfg.models if only is None else tuple(only)
    unknown = [m for m in only if m not in cfg.models]
    if unknown:
        raise ValueError(f"models {unknown} are not in this study's models {list(cfg.models)}")
    claim_out_dir(out, {"experiment": "listops", **asdict(cfg)})
    corpus = load_labelled(cfg.data, "byte", cfg.seq_len)
    for label in only:
        train_setting(cfg.model_config(label), corpus.train, corpus.valid, cfg.train_config(), out / f"train-{label}",
                      device, progress)  # fmt: skip
    results = {**collect_results(cfg, out, device, majority_share(corpus.valid.labels)), "command": command}
    _write_text(out / "listops.json", json.dumps(results, indent=1) + "\n")
    _write_text(out / "listops.md", listops_table(results))
    plot_listops(results, out)
    return results


def model_results(cfg: ListOpsConfig, label: str, trainer: dict) -> dict:
    """A finished model's entry: validation accuracy (final and curve), training time, size."""
    state = TrainState(step=trainer["step"], history=trainer["history"])
    total = training_seconds(state, cfg.train_config())
    evals = [r for r in state.history if "eval_accuracy" in r]
    with torch.device("meta"):
        model = ReformerForSequenceClassification(config=cfg.model_config(label))
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "accuracy": 100 * evals[-1]["eval_accuracy"], "eval_loss": evals[-1]["eval_loss"],
        "train_seconds": total, "seconds_per_step": total / max(1, state.step), "parameters": parameters,
        "curve": [[r["step"], 100 * r["eval_accuracy"]] for r in evals],
    }  # fmt: skip


def majority_share(labels: torch.Tensor) -> float:
    """Accuracy (%) of always answering the most common label (ListOps' values are not uniform)."""
    return 100 * torch.bincount(labels, minlength=10).max().item() / len(labels)


def collect_results(cfg: ListOpsConfig, out: Path, device: str, majority: float) -> dict:
    """The results of every model of ``cfg`` whose run in ``out`` reached ``cfg.steps``;
    ``majority``: the validation accuracy of the most common label."""
    models = {}
    for label in cfg.models:
        found = checkpoint_dirs(out / f"train-{label}")
        trainer = load_trainer_state(found[-1]) if found else None
        if trainer is not None and trainer["step"] == cfg.steps:
            models[label] = model_results(cfg, label, trainer)
    return {"config": asdict(cfg), "device": device, "lra_table1": LRA_TABLE1, "majority_class": majority,
            "models": models, "not_yet_run": [m for m in cfg.models if m not in models]}  # fmt: skip


def listops_table(results: dict) -> str:
    """Markdown: each model's validation accuracy beside LRA's Table 1."""
    cfg = results["config"]
    lines = [
        f"ListOps: {cfg['n_train']:,} training expressions of up to {cfg['seq_len']:,} tokens, {cfg['steps']:,} steps "
        f"of {cfg['batch_size']}, width {cfg['dim']}, depth {cfg['depth']} ({results['device']}).",
        "",
        "| model | validation accuracy (%) | LRA Table 1 (test, %) | seconds / step | parameters |",
        "|---|---|---|---|---|",
    ]
    for label in cfg["models"]:
        m = results["models"].get(label)
        lra = LRA_TABLE1.get(LRA_ROW.get(label, ""), "")
        if m is None:
            lines.append(f"| {label} | not yet run | {lra} | | |")
        else:
            lines.append(f"| {label} | {m['accuracy']:.2f} | {lra} | {m['seconds_per_step']:.2f} | "
                         f"{m['parameters']:,} |")  # fmt: skip
    lines.append(f"| most common label | {results['majority_class']:.2f} | | | |")
    lines.append(f"| chance | 10.00 | {LRA_TABLE1['chance']} | | |")
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def plot_listops(results: dict, out: Path) -> None:
    """``listops-curves.png``: validation accuracy by step, with chance."""
    from .plots import finish_axes, pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, m in results["models"].items():
        steps, accuracy = zip(*m["curve"], strict=True)
        ax.plot(steps, accuracy, "o-", markersize=3, label=label)
    ax.axhline(LRA_TABLE1["chance"], color="gray", linestyle=":", label="chance")
    finish_axes(ax, "step", "validation accuracy (%)")
    save_png(fig, out / "listops-curves.png")


def publish(out: Path, dest: Path) -> None:
    """Copy the study's result files from ``out`` into ``dest`` (e.g. ``docs/listops``)."""
    copy_results(out, dest, PUBLISHED)


def with_overrides(cfg: ListOpsConfig, **overrides) -> ListOpsConfig:
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
