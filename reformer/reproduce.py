"""The paper's experiments, one function each (``reformer.cli.reproduce`` parses argv; see docs/reproduction.md).

* :func:`run_duplication` - the duplication task (§2.1, Table 2): train a 1-layer model with
  full attention and with LSH, evaluate each with every attention setting.
* :func:`run_lm` - language modelling (Fig. 4 analogue): the same small model with full
  attention and LSH at several ``n_hashes``, equal steps, held-out bits per byte; and the
  Fig. 3 ablations: a standard Transformer with separate or shared QK against the reversible
  model (:data:`LM_BASELINES`).

An output directory holds ``config.json`` (the experiment's configuration; a directory is never
reused for another), one ordinary training run directory per setting (``train-full/``,
``train-lsh-4/``, ...: repeating the command resumes or reuses them) and the results:
``duplication.md`` + ``duplication.json``, or ``lm.md`` + ``lm.json`` + ``lm-bpc.png``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .atomic import atomic_write
from .config import ReformerConfig
from .data import DuplicationTask, load_corpus
from .model import ReformerLM, TokenModel
from .plots import finish_axes, pyplot, save_png
from .switch import switch_attention
from .train import MODEL_CLASSES, Data, TrainConfig, TrainState, train

#: Paper Table 2, accuracy %: trained with -> evaluated with.
PAPER_TABLE2 = {
    "full": {"full": 100.0, "lsh-8": 94.8, "lsh-4": 92.5, "lsh-2": 76.9, "lsh-1": 52.5},
    "lsh-4": {"full": 0.8, "lsh-8": 100.0, "lsh-4": 99.9, "lsh-2": 99.4, "lsh-1": 91.9},
    "lsh-2": {"full": 0.8, "lsh-8": 100.0, "lsh-4": 99.9, "lsh-2": 98.1, "lsh-1": 86.8},
    "lsh-1": {"full": 0.8, "lsh-8": 99.9, "lsh-4": 99.6, "lsh-2": 94.8, "lsh-1": 77.9},
}

Progress = Callable[[str], None]


def parse_attention(label: str) -> int | None:
    """``"full"`` -> None (dense attention); ``"lsh-N"`` -> N hashing rounds."""
    match = re.fullmatch(r"lsh-([1-9][0-9]*)", label)
    if label != "full" and match is None:
        raise ValueError(f"attention setting must be 'full' or 'lsh-N' (N >= 1), got {label!r}")
    return None if match is None else int(match.group(1))


#: Language-model variants other than ``full`` / ``lsh-N`` (paper Fig. 3): standard pre-norm
#: residual stacks with dense attention, with separate or shared query/key projections.
LM_BASELINES: dict[str, dict] = {
    "transformer": dict(residual="standard", shared_qk=False, use_full_attn=True),
    "transformer-shared-qk": dict(residual="standard", shared_qk=True, use_full_attn=True),
}
_NAMES = {"full": "full", "transformer": "Transformer", "transformer-shared-qk": "Transformer, shared QK"}


def _display(label: str) -> str:
    return _NAMES.get(label) or label.upper()


@dataclass
class DuplicationConfig:
    """The duplication experiment. Defaults are the paper's model and length (``--scale paper``)."""

    seq_len: int = 1024
    """Length of ``0w0w`` (``w`` has ``seq_len / 2 - 1`` symbols)."""
    steps: int = 150_000
    """Training steps per model."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warm-up, cosine decay)."""
    warmup_steps: int = 1000
    """Warm-up steps."""
    bucket_size: int = 64
    """LSH chunk length (``seq_len // bucket_size`` buckets per round)."""
    n_symbols: int = 127
    """``w`` is drawn from symbols ``1..n_symbols`` (0 separates the copies)."""
    dim: int = 256
    """Model width = feed-forward width (1 layer)."""
    heads: int = 4
    """Attention heads."""
    eval_batches: int = 8
    """Batches of ``batch_size`` sequences each accuracy is averaged over."""
    trained_with: tuple[str, ...] = ("full", "lsh-4", "lsh-2", "lsh-1")
    """Attention of the trained models (table rows): ``full`` or ``lsh-N``."""
    evaluated_with: tuple[str, ...] = ("full", "lsh-8", "lsh-4", "lsh-2", "lsh-1")
    """Attention each model is evaluated with (table columns)."""
    seed: int = 0
    """Seeds the models, the training batches (``seed``) and the evaluation batches (``seed + 1``)."""

    def __post_init__(self) -> None:
        self.trained_with, self.evaluated_with = tuple(self.trained_with), tuple(self.evaluated_with)
        for label in self.trained_with + self.evaluated_with:
            parse_attention(label)
        self.task()  # checks seq_len and n_symbols
        self.train_config()  # checks the sizes

    def task(self, seed: int = 0) -> DuplicationTask:
        return DuplicationTask(self.seq_len, self.batch_size, self.n_symbols, seed=seed)

    def model_config(self, label: str) -> ReformerConfig:
        """A causal 1-layer model, d_model = d_ff = ``dim``. Learned absolute positions: in one
        layer a query can find the copy of its next symbol (``seq_len / 2 - 1`` back) only by
        position, and shared-QK hashing then has to put the two positions in one bucket."""
        n_hashes = parse_attention(label)
        return ReformerConfig(
            num_tokens=self.n_symbols + 1, dim=self.dim, depth=1, heads=self.heads, ff_mult=1,
            max_seq_len=self.seq_len, bucket_size=self.bucket_size, n_hashes=n_hashes or 1,
            use_full_attn=n_hashes is None, causal=True, absolute_position_emb=True,
        )  # fmt: skip

    def train_config(self) -> TrainConfig:
        every = max(1, self.steps // 10)  # ten evaluations and checkpoints (resume points) per model
        return TrainConfig(
            steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
            warmup_steps=self.warmup_steps, eval_every=every, save_every=every, keep_last=1,
            eval_batches=self.eval_batches, seed=self.seed,
        )  # fmt: skip


#: ``--scale``: ``paper`` is the paper's setting (a GPU job); ``cpu`` finishes in about an hour on
#: 2 CPU cores (measured per step, see docs/reproduction.md).
DUPLICATION_SCALES = {
    "paper": DuplicationConfig(),
    "cpu": DuplicationConfig(seq_len=256, steps=2500, batch_size=16, warmup_steps=200, bucket_size=16),
}


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> float:
    """Fraction of the ``scored`` positions (bool ``(b, n)``) where the argmax of ``logits``
    ``(b, n, vocab)`` is ``targets`` ``(b, n)``."""
    count = int(scored.sum())
    if count == 0:
        raise ValueError("scored marks no position")
    hits = (logits.argmax(-1) == targets) & scored  # (b, n)
    return int(hits.sum()) / count


@torch.no_grad()
def duplication_accuracy(model: ReformerLM, task: DuplicationTask, batches: int) -> float:
    """Next-token accuracy on the second copy, over ``batches`` batches drawn from ``task``
    (in eval mode: deterministic hashing)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    accuracies = []
    for _ in range(batches):
        tokens, scored = (t.to(device) for t in task.next_batch())  # (b, n) each
        logits = model(tokens[:, :-1])  # (b, n - 1, vocab): position i predicts token i + 1
        accuracies.append(masked_accuracy(logits, tokens[:, 1:], scored[:, 1:]))
    model.train(was_training)
    return sum(accuracies) / len(accuracies)  # equal counts per batch: the mean is exact


def claim_out_dir(out: Path, config: dict) -> None:
    """Create ``out`` for an experiment with ``config`` (JSON-able), or accept it when it already
    holds the same experiment (its runs are then resumed); refuse one holding another."""
    path = out / "config.json"
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(config)):  # tuples read back as lists
            raise ValueError(f"{out} holds an experiment with another configuration; choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(config, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def copy_results(out: Path, dest: Path, names: tuple[str, ...]) -> None:
    """Copy an experiment's result files ``names`` from ``out`` into ``dest`` (``--publish``)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        data = (out / name).read_bytes()
        atomic_write(dest / name, lambda tmp, data=data: Path(tmp).write_bytes(data))


def train_setting(
    config: ReformerConfig, train_data: Data, valid_data: Data, cfg: TrainConfig, run_dir: Path, device: str,
    progress: Progress | None = None,
) -> tuple[TokenModel, TrainState]:  # fmt: skip
    """Build the model of ``cfg.objective`` from ``config`` (seeded by ``cfg.seed``) and train it
    in ``run_dir``, resuming (or just loading) what an earlier call left there."""
    torch.manual_seed(cfg.seed)  # the same initial weights and hash seeds on every call
    model = MODEL_CLASSES[cfg.objective](config=config).to(device)

    def report(record: dict, state: TrainState) -> None:
        if progress is not None and "eval_loss" in record:
            progress(f"{run_dir.name}: step {record['step']}/{cfg.steps}, loss {record['loss']:.4f}, "
                     f"validation {record['eval_loss']:.4f} nats")  # fmt: skip

    state = train(model, train_data, valid_data, cfg, run_dir, resume=True, on_step=report)
    return model, state


def training_seconds(state: TrainState, cfg: TrainConfig) -> float:
    """Time spent in training steps (evaluations excluded), summed over resumed sessions."""
    tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
    return sum(tokens / r["tokens_per_s"] for r in state.history)


def run_duplication(cfg: DuplicationConfig, out: Path, device: str = "cpu", progress: Progress | None = None) -> dict:
    """Train one model per ``cfg.trained_with``, evaluate each with every ``cfg.evaluated_with``;
    write ``duplication.json`` and ``duplication.md`` in ``out`` and return the results."""
    claim_out_dir(out, {"experiment": "duplication", **asdict(cfg)})
    results: dict = {"config": asdict(cfg), "accuracy": {}, "final_loss": {}, "train_seconds": {}}
    tcfg = cfg.train_config()
    for trained in cfg.trained_with:
        task = cfg.task()
        model, state = train_setting(cfg.model_config(trained), task, task, tcfg, out / f"train-{trained}", device,
                                     progress)  # fmt: skip
        results["final_loss"][trained] = state.history[-1]["eval_loss"]
        results["train_seconds"][trained] = training_seconds(state, tcfg)
        row = results["accuracy"][trained] = {}
        for evaluated in cfg.evaluated_with:
            n_hashes = parse_attention(evaluated)
            switch_attention(model, n_hashes=n_hashes, full_attention=n_hashes is None)
            row[evaluated] = 100 * duplication_accuracy(model, cfg.task(seed=cfg.seed + 1), cfg.eval_batches)
            if progress is not None:
                progress(f"trained with {trained}, evaluated with {evaluated}: {row[evaluated]:.1f}% accuracy")
    _write_text(out / "duplication.json", json.dumps(results, indent=2) + "\n")
    _write_text(out / "duplication.md", duplication_table(results))
    return results


def duplication_table(results: dict) -> str:
    """Markdown: rows = trained with, columns = evaluated with; each cell ``ours (paper)``
    accuracy in %, ``-`` where the paper has no number."""
    cfg, acc = results["config"], results["accuracy"]
    columns = cfg["evaluated_with"]
    lines = [
        f"Duplication task, sequence length {cfg['seq_len']}, {cfg['steps']:,} steps of {cfg['batch_size']}; "
        "accuracy % on the second copy, ours (paper Table 2)",
        "",
        "| trained with | " + " | ".join(f"eval {_display(c)}" for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for trained, row in acc.items():
        paper = PAPER_TABLE2.get(trained, {})
        cells = [f"{row[c]:.1f} ({paper[c]:g})" if c in paper else f"{row[c]:.1f} (-)" for c in columns]
        lines.append(f"| {_display(trained)} | " + " | ".join(cells) + " |")
    target = acc.get("lsh-4", {}).get("lsh-8")
    if target is not None:
        verdict = "met" if target >= 99 else "not met"
        lines += ["", f"Target: trained with LSH-4, evaluated with LSH-8 >= 99%: {target:.2f}% ({verdict})."]
    return "\n".join(lines) + "\n"


@dataclass
class LMConfig:
    """The language-modelling comparison: one small causal byte model per attention variant. The
    defaults take about an hour on 2 CPU cores (see docs/reproduction.md)."""

    data: str = "builtin"
    """``builtin``, ``pysrc``, a file, or ``enwik8:PATH`` (bytes; validated on the held-out split)."""
    seq_len: int = 256
    """Tokens per training window (also the model's max_seq_len)."""
    steps: int = 2500
    """Training steps per variant (the same for all)."""
    batch_size: int = 8
    """Windows per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW, linear warm-up, cosine decay)."""
    warmup_steps: int = 100
    """Warm-up steps."""
    eval_every: int = 125
    """Steps between points of the bits-per-byte curves."""
    eval_batches: int = 8
    """Held-out batches per point (the same windows each time)."""
    dim: int = 128
    """Model width."""
    depth: int = 2
    """Layers, all LSH (or all full)."""
    heads: int = 4
    """Attention heads."""
    bucket_size: int = 32
    """LSH chunk length."""
    variants: tuple[str, ...] = ("full", "lsh-1", "lsh-2", "lsh-4", "lsh-8", "transformer", "transformer-shared-qk")
    """The trained models: the reversible Reformer with ``full`` (dense shared-QK) or ``lsh-N``
    attention, or a baseline of :data:`LM_BASELINES`."""
    seed: int = 0
    """Seeds the models and the training windows (held-out windows: ``seed + 1``)."""

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be a non-empty list without repeats, got {list(self.variants)}")
        for label in self.variants:
            if label not in LM_BASELINES:
                try:
                    parse_attention(label)
                except ValueError:
                    raise ValueError(
                        f"variant must be 'full', 'lsh-N' or one of {list(LM_BASELINES)}, got {label!r}"
                    ) from None
        self.train_config()  # checks the sizes

    def model_config(self, label: str) -> ReformerConfig:
        if label in LM_BASELINES:
            attention = LM_BASELINES[label]
        else:
            n_hashes = parse_attention(label)
            attention = dict(n_hashes=n_hashes or 1, use_full_attn=n_hashes is None)
        return ReformerConfig(
            num_tokens=256, dim=self.dim, depth=self.depth, heads=self.heads, max_seq_len=self.seq_len,
            bucket_size=self.bucket_size, causal=True, **attention,
        )  # fmt: skip

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
            warmup_steps=self.warmup_steps, eval_every=self.eval_every, save_every=self.eval_every, keep_last=1,
            eval_batches=self.eval_batches, seed=self.seed,
        )  # fmt: skip


def run_lm(cfg: LMConfig, out: Path, device: str = "cpu", progress: Progress | None = None) -> dict:
    """Train one model per ``cfg.variants`` on ``cfg.data``; write ``lm.json``, ``lm.md`` and
    the held-out bits-per-byte curves ``lm-bpc.png`` in ``out`` and return the results."""
    corpus = load_corpus(cfg.data)
    claim_out_dir(out, {"experiment": "lm", **asdict(cfg)})
    results: dict = {"config": asdict(cfg), "curves": {}, "train_seconds": {}}
    tcfg = cfg.train_config()
    for label in cfg.variants:
        _, state = train_setting(cfg.model_config(label), corpus.train, corpus.valid, tcfg, out / f"train-{label}",
                                 device, progress)  # fmt: skip
        results["curves"][label] = [[r["step"], r["eval_bpc"]] for r in state.history if "eval_bpc" in r]
        results["train_seconds"][label] = training_seconds(state, tcfg)
    _write_text(out / "lm.json", json.dumps(results, indent=2) + "\n")
    _write_text(out / "lm.md", lm_table(results))
    plot_curves(results, out / "lm-bpc.png")
    return results


def lm_table(results: dict) -> str:
    """Markdown: final held-out bits per byte of each variant and its gap to full attention."""
    cfg, curves = results["config"], results["curves"]
    final = {label: curve[-1][1] for label, curve in curves.items()}  # the last point of each curve
    full = final.get("full")
    lines = [
        f"Language modelling on {cfg['data']}, {cfg['depth']} layers of width {cfg['dim']}, "
        f"windows of {cfg['seq_len']}, {cfg['steps']:,} steps of {cfg['batch_size']}; held-out bits per byte",
        "",
        "| attention | bits/byte | vs full | training s |",
        "|---|---|---|---|",
    ]
    for label, bpc in final.items():
        gap = "-" if full is None else f"{bpc - full:+.3f}"
        lines.append(f"| {_display(label)} | {bpc:.3f} | {gap} | {results['train_seconds'][label]:.0f} |")
    comparisons = [  # (what, variant, reference): the paper's Fig. 3 pairs, one change each
        ("shared QK vs separate QK (standard Transformer, dense attention)", "transformer-shared-qk", "transformer"),
        ("reversible vs standard residual stack (shared QK, dense attention)", "full", "transformer-shared-qk"),
    ]
    ablations = [f"* {what}: {final[a]:.3f} vs {final[b]:.3f} ({final[a] - final[b]:+.3f})"
                 for what, a, b in comparisons if a in final and b in final]  # fmt: skip
    if ablations:
        lines += ["", "Fig. 3 analogue, final bits per byte:", "", *ablations]
    if full is not None and "lsh-8" in final:
        gap = final["lsh-8"] - full
        verdict = "met" if gap <= 0.03 else "not met"
        lines += ["", f"Target: LSH-8 within 0.03 bits/byte of full attention: {gap:+.3f} ({verdict})."]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> None:
    plt = pyplot()

    curves = results["curves"]
    panels = [  # Fig. 4 analogue, then Fig. 3 analogue when its baselines were trained
        ("full attention vs LSH", [label for label in curves if label not in LM_BASELINES]),
        (
            "ablations (Fig. 3)",
            [label for label in ("transformer", "transformer-shared-qk", "full") if label in curves],
        ),
    ]
    panels = [(title, labels) for title, labels in panels if labels and set(labels) != {"full"}]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, (title, labels) in zip(axes[0], panels, strict=True):
        for label in labels:
            steps, bpc = zip(*curves[label], strict=True)
            ax.plot(steps, bpc, "o-", markersize=3, label=_display(label))
        finish_axes(ax, "step", "held-out bits per byte", f"{results['config']['data']}: {title}")
    save_png(fig, path)


def with_overrides(cfg: DuplicationConfig | LMConfig, **overrides) -> DuplicationConfig | LMConfig:
    """``cfg`` with the fields given as not None replaced (and validated again)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
