"""The training loop, as plain functions: no argv here (``reformer.cli.train`` builds the arguments).

A run directory holds ``checkpoints/step-NNNNNNN/`` (weights + config via
``save_pretrained``, and ``trainer.pt`` with optimizer, data-sampler and RNG state), each
written to a temporary directory and renamed into place, the last ``keep_last`` kept.
Resuming restores all of it, so a resumed run computes the same losses as an uninterrupted
one (bit for bit on CPU in fp32).

Under ``torchrun`` (see ``distributed.py``) each process trains on its own ``batch_size`` rows
of a global batch drawn from the same seeded stream, so the batches (and the run) do not
depend on how many processes share them: a run can resume with another number of processes.
Losses are averaged over processes; only rank 0 writes checkpoints and reports steps.

What is optimised is the run's objective (``TrainConfig.objective``): ``causal`` next-token
prediction (:class:`CausalLM`), ``mlm`` masked-token prediction (:class:`MaskedLM`) or
``classify`` documents (:class:`Classification`). An objective turns the data into seeded
batches, a batch into a loss, and a validation batch into metrics; the loop is the same for all.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import distributed
from .atomic import TMP_DIR_PREFIX, atomic_directory, write_file
from .checkpoint import verify_manifest, write_manifest
from .checks import check_int
from .config import ReformerConfig
from .data import DuplicationTask, WindowSampler
from .heads import ReformerForMaskedLM, ReformerForSequenceClassification, mask_tokens
from .labelled import ExampleSampler, LabelledSet
from .model import ReformerLM, TokenModel
from .runs import run_lock

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("cosine", "rsqrt", "constant")
OBJECTIVES = ("causal", "mlm", "classify")
#: ``mlm``: the share of tokens chosen for prediction (BERT's).
MASK_P = 0.15


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in the whole run."""
    batch_size: int = 4
    """Sequences per micro-batch (per process)."""
    seq_len: int = 2048
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule: final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """``cosine`` decay, the paper's ``rsqrt``, or ``constant`` after warm-up."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast with a gradient scaler)."""
    eval_every: int = 100
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_batches: int = 4
    """Validation micro-batches per evaluation."""
    save_every: int = 100
    """Write a checkpoint every this many steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept in the run directory."""
    seed: int = 0
    """Seeds the model's RNG use (dropout, hashing) and the data windows."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state with FSDP2 (the whole
    model as one unit) instead of replicating them with DDP; ``fp32`` or ``bf16``."""
    compile: bool = False
    """Train through ``torch.compile`` (the model compiles to one graph; the first step, and the
    first of a new shape, take the compile time). Evaluation stays eager."""
    objective: str = "causal"
    """``causal`` (next token), ``mlm`` (masked tokens) or ``classify`` (labelled documents)."""
    data_name: str | None = None
    """The training data as the model card names it (a corpus or file name, not a local path); None: unsaid."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "keep_last"):  # fmt: skip
            check_int(name, getattr(self, name), 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must be an int64, got {self.seed!r}")
        for name in ("lr", "weight_decay", "clip_grad", "min_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("weight_decay", "clip_grad"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.fsdp and self.precision == "fp16":
            raise ValueError("fsdp supports precision fp32 or bf16, not fp16 (its gradient scaler is not shard-aware)")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based)."""
    warmup = max(1, cfg.warmup_steps)
    if cfg.schedule == "rsqrt":  # the paper's: lr * min(step / warmup, sqrt(warmup / step))
        return min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))
    ramp = min(1.0, (step + 1) / warmup)
    if cfg.schedule == "constant" or step < warmup:
        return ramp
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    others = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def autocast_for(precision: str, device: torch.device):
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def lm_loss(
    model: torch.nn.Module, batch: torch.Tensor, precision: str, scored: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``batch`` ``(b, n + 1)``; with ``scored``
    (bool, like ``batch``) only the targets it marks count. Chunked: the whole logits never
    exist (:mod:`reformer.loss`)."""
    targets = batch[:, 1:] if scored is None else batch[:, 1:].masked_fill(~scored[:, 1:], -100)
    with autocast_for(precision, batch.device):
        return model(batch[:, :-1], targets=targets)


Data = torch.Tensor | DuplicationTask | LabelledSet
Batch = tuple[torch.Tensor, ...]


class CausalLM:
    """Next-token prediction on random windows of a token stream, or on the duplication task
    (its second copy scored)."""

    def __init__(self, config: ReformerConfig):
        del config  # the loss needs nothing of it

    def sampler(self, data: Data, cfg: TrainConfig, seed: int, evaluation: bool = False):
        del evaluation  # windows are random either way: the seed fixes the validation ones
        rows = cfg.batch_size * distributed.world_size()
        if isinstance(data, DuplicationTask):
            return DuplicationTask(data.seq_len, rows, data.n_symbols, seed=seed)
        return WindowSampler(data, cfg.seq_len, rows, seed=seed)

    def loss(self, model: torch.nn.Module, batch: Batch, precision: str) -> torch.Tensor:
        return lm_loss(model, batch[0], precision, batch[1] if len(batch) > 1 else None)

    def metrics(self, model: torch.nn.Module, batch: Batch, precision: str) -> dict[str, float]:
        loss = self.loss(model, batch, precision).item()  # (batches of equal size: each counts 1)
        return {"eval_loss": loss, "eval_bpc": loss / math.log(2), "count": 1.0}


class MaskingSampler:
    """Windows of ``seq_len`` tokens with BERT's corruption (:func:`~reformer.heads.mask_tokens`,
    the mask being token ``num_tokens - 1``); windows and masks come from seeded generators whose
    states travel with checkpoints."""

    def __init__(self, data: torch.Tensor, seq_len: int, rows: int, num_tokens: int, seed: int):
        self.windows = WindowSampler(data, seq_len, rows, seed=seed)
        self.num_tokens = num_tokens
        self.generator = torch.Generator().manual_seed(seed + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs`` and ``labels`` ``(rows, seq_len)``; labels are -100 where nothing is predicted."""
        tokens = self.windows.next_batch()[:, :-1]  # (rows, seq_len): a window has a next-token target more
        return mask_tokens(tokens, self.num_tokens - 1, self.num_tokens, MASK_P, generator=self.generator)

    def state_dict(self) -> dict:
        return {"windows": self.windows.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state["windows"])
        self.generator.set_state(state["generator"])


class MaskedLM:
    """Masked-token prediction (bidirectional pre-training of a
    :class:`~reformer.heads.ReformerForMaskedLM`) on random windows of a token stream; the
    model's last token id is the mask, which the data never holds."""

    def __init__(self, config: ReformerConfig):
        self.num_tokens = config.num_tokens

    def sampler(self, data: Data, cfg: TrainConfig, seed: int, evaluation: bool = False) -> MaskingSampler:
        del evaluation
        if not isinstance(data, torch.Tensor):
            raise ValueError("masked-token training reads a token stream (a corpus), not a task or documents")
        return MaskingSampler(data, cfg.seq_len, cfg.batch_size * distributed.world_size(), self.num_tokens, seed)

    def loss(self, model: torch.nn.Module, batch: Batch, precision: str) -> torch.Tensor:
        inputs, labels = batch
        with autocast_for(precision, inputs.device):
            return model(inputs, labels=labels)  # mean over the chosen positions only

    def metrics(self, model: torch.nn.Module, batch: Batch, precision: str) -> dict[str, float]:
        inputs, labels = batch
        with autocast_for(precision, inputs.device):
            logits = model(inputs)  # (b, n, num_tokens)
        chosen = labels != -100  # (b, n)
        return _scores(logits[chosen], labels[chosen])


class Classification:
    """Document classification: batches of labelled documents (each epoch shuffled; the
    validation ones in order), padding hidden by the input mask."""

    def __init__(self, config: ReformerConfig):
        del config

    def sampler(self, data: Data, cfg: TrainConfig, seed: int, evaluation: bool = False) -> ExampleSampler:
        if not isinstance(data, LabelledSet):
            raise ValueError("classification reads labelled documents, not a token stream")
        return ExampleSampler(data, cfg.batch_size * distributed.world_size(), seed=seed, evaluation=evaluation)

    def loss(self, model: torch.nn.Module, batch: Batch, precision: str) -> torch.Tensor:
        ids, mask, labels = batch
        with autocast_for(precision, ids.device):
            return model(ids, input_mask=mask, labels=labels)

    def metrics(self, model: torch.nn.Module, batch: Batch, precision: str) -> dict[str, float]:
        ids, mask, labels = batch
        with autocast_for(precision, ids.device):
            logits = model(ids, input_mask=mask)  # (b, num_labels)
        return _scores(logits, labels)


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Summed cross-entropy (nats) and correct predictions of ``logits`` ``(m, classes)`` against
    ``labels`` ``(m,)``, and the ``count`` of labels scored (-100: none)."""
    scored = labels != -100
    return {"eval_loss": torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item(),
            "eval_accuracy": ((logits.argmax(dim=-1) == labels) & scored).sum().item(),
            "count": scored.sum().item()}  # fmt: skip


Objective = CausalLM | MaskedLM | Classification
OBJECTIVE_CLASSES = {"causal": CausalLM, "mlm": MaskedLM, "classify": Classification}
#: The model class that each objective trains.
MODEL_CLASSES: dict[str, type[TokenModel]] = {
    "causal": ReformerLM, "mlm": ReformerForMaskedLM, "classify": ReformerForSequenceClassification,
}  # fmt: skip


def objective_for(cfg: TrainConfig, config: ReformerConfig) -> Objective:
    """The objective of ``cfg`` for a model of ``config``."""
    return OBJECTIVE_CLASSES[cfg.objective](config)


def next_batch(source, device: torch.device) -> Batch:
    """This process's rows of the source's next global batch (every process draws the same
    one: the draw is cheap next to the model, and it keeps the shards disjoint)."""
    out = source.next_batch()
    parts = out if isinstance(out, tuple) else (out,)
    rows = distributed.local_rows(len(parts[0]) // distributed.world_size())
    return tuple(part[rows].to(device) for part in parts)


@torch.no_grad()
def evaluate(model: TokenModel, data: Data, cfg: TrainConfig) -> dict:
    """The objective's validation metrics (loss in nats; bits per token for ``causal``, accuracy
    for ``mlm`` and ``classify``), on the same ``cfg.eval_batches`` batches every time, so
    evaluations are comparable. Each batch's metrics are sums over what it scored and their
    ``count``: the result is the mean over every item scored, in all batches and processes
    (each process scores its rows; NaN if nothing was scored)."""
    objective = objective_for(cfg, model.config)
    source = objective.sampler(data, cfg, seed=cfg.seed + 1, evaluation=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for _ in range(cfg.eval_batches):
        for name, value in objective.metrics(model, next_batch(source, device), cfg.precision).items():
            totals[name] = totals.get(name, 0.0) + value
    model.train(was_training)
    count = distributed.mean(totals.pop("count"))  # (means over processes: their ratio is that of the sums)
    return {name: distributed.mean(total) / count if count else math.nan for name, total in totals.items()}


def tokens_per_step(cfg: TrainConfig) -> int:
    """Tokens one optimizer step trains on, over every process."""
    return cfg.grad_accum * cfg.batch_size * cfg.seq_len * distributed.world_size()


def card_training(state: TrainState, cfg: TrainConfig) -> dict[str, str]:
    """What a checkpoint's model card says of its training: the data (when named), steps, tokens,
    context, and the latest validation loss."""
    tokens = state.step * tokens_per_step(cfg)
    facts = {"data": cfg.data_name} if cfg.data_name else {}
    facts.update({"steps": f"{state.step:,} of {cfg.steps:,}", "tokens seen": f"{tokens:,}",
                  "context": f"{cfg.seq_len:,}"})  # fmt: skip
    evaluated = [r for r in state.history if "eval_loss" in r]
    if evaluated:
        last = evaluated[-1]
        score = (f"{last['eval_bpc']:.4f} bits per token" if "eval_bpc" in last
                 else f"accuracy {last['eval_accuracy']:.2%}")  # fmt: skip
        facts["validation"] = f"{last['eval_loss']:.4f} nats, {score} (step {last['step']:,})"
    return facts


CHECKPOINT_NAME = re.compile(r"step-([0-9]+)")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, in step order: the real directories named ``step-<digits>``
    (anything else, symlinks included, is not ours: never listed, so never pruned)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory ``step-<digits>``."""
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


def _full_model(model: TokenModel) -> TokenModel:
    """``model``, or under FSDP a CPU copy with the gathered weights (a collective)."""
    if not distributed.is_sharded(model):
        return model
    weights = distributed.gathered(model.state_dict())
    with torch.device("meta"), torch.random.fork_rng(devices=[]):  # building draws hash seeds: keep the run's RNG
        copy = type(model)(config=model.config)
    copy.load_state_dict(weights, assign=True)
    return copy


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    sampler,
    state: TrainState,
    cfg: TrainConfig,
    vocab: dict | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path | None:
    """Write ``checkpoints/step-NNNNNNN`` atomically (with ``vocab.json`` when given) and prune
    to ``keep_last``. Every process calls it (FSDP gathers its shards); rank 0 writes and
    returns the path, the others None."""
    model, optimizer_state = _full_model(model), distributed.gathered(optimizer.state_dict())
    if not distributed.is_main():
        return None
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    with atomic_directory(final) as tmp:
        model.save_pretrained(tmp, training=card_training(state, cfg), vocab=vocab)
        trainer = {
            "step": state.step,
            "history": state.history,
            "train_config": asdict(cfg),
            "optimizer": optimizer_state,
            "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "grad_scaler": None if scaler is None else scaler.state_dict(),  # fp16 loss scale
        }
        write_file(tmp / "trainer.pt", lambda path: torch.save(trainer, path))
        write_manifest(tmp)
    for old in checkpoint_dirs(run_dir)[: -cfg.keep_last]:
        shutil.rmtree(old)
    for stale in root.glob(f"{TMP_DIR_PREFIX}*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model) -> dict:
    """Load a checkpoint directory's weights into ``model`` (before FSDP shards it); return the
    trainer state for :func:`restore_trainer`."""
    from safetensors.torch import load_model

    verify_manifest(path)
    load_model(model, path / "model.safetensors", strict=True)
    return load_trainer_state(path)


def load_trainer_state(checkpoint: Path) -> dict:
    """``trainer.pt`` of a checkpoint directory, read without unpickling objects: only tensors,
    numbers, strings, lists and dicts load, so a planted file cannot run code."""
    path = checkpoint / "trainer.pt"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ValueError(f"refusing to load {path}: it holds objects other than tensors, numbers, strings, "
                         "lists and dicts (it was not written by reformer)") from None  # fmt: skip
    except (RuntimeError, EOFError) as exc:  # not a torch zip file, or a truncated one
        raise ValueError(f"corrupt {path}: {str(exc).strip().splitlines()[0]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"corrupt {path}: not a trainer state (no step)")
    return state


def restore_trainer(trainer: dict, optimizer, sampler, scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Restore optimizer (cut to this process's shards under FSDP), data position, RNG and the
    fp16 loss scale."""
    if scaler is not None and trainer.get("grad_scaler"):
        scaler.load_state_dict(trainer["grad_scaler"])
    optimizer.load_state_dict(distributed.sharded_optimizer_state(optimizer, trainer["optimizer"]))
    sampler.load_state_dict(trainer["sampler"])
    torch.set_rng_state(trainer["torch_rng"])
    return TrainState(step=trainer["step"], history=trainer["history"])


def train(
    model: TokenModel,
    train_data: Data,
    valid_data: Data,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[dict, TrainState], None] | None = None,
    vocab: dict | None = None,
) -> TrainState:
    """Train ``model`` for ``cfg.objective`` on ``train_data`` (a token stream, a synthetic task,
    or labelled documents); see the module doc for checkpoints.

    ``stop_after``: stop (with a checkpoint) after this many steps of *this* call, as an
    interruption would; ``should_stop()`` is asked after every step (e.g. set by SIGINT).
    ``on_step(record, state)`` receives each step's record (loss, lr, tokens/s, evals) and the
    run's state, whose history includes the steps before a resume (on rank 0 only). ``vocab``
    (the vocabulary, and a classifier's label names) is saved with each checkpoint.
    Raises :class:`TrainingDiverged` on a non-finite loss, before touching the checkpoints.
    """
    run_dir = Path(run_dir)
    with run_lock(run_dir) if distributed.is_main() else nullcontext():  # one writer per run
        device = next(model.parameters()).device
        torch.manual_seed(cfg.seed)
        objective = objective_for(cfg, model.config)
        sampler = objective.sampler(train_data, cfg, seed=cfg.seed)
        objective.sampler(valid_data, cfg, seed=0, evaluation=True)  # fail early if the validation split is too short
        trainer = load_checkpoint(checkpoint_dirs(run_dir)[-1], model) if resume and checkpoint_dirs(run_dir) else None
        net = distributed.wrap(model, fsdp=cfg.fsdp, find_unused=model.config.layer_dropout > 0)
        if cfg.compile:
            net = torch.compile(net)
        optimizer = build_optimizer(model, cfg)  # after wrap: FSDP replaces the parameters by shards
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        state = TrainState() if trainer is None else restore_trainer(trainer, optimizer, sampler, scaler)
        model.train()
        start_step = state.step
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(state.step, cfg)
            total = torch.zeros((), device=device)
            for i in range(cfg.grad_accum):
                batch = next_batch(sampler, device)
                with distributed.sync_gradients(net, sync=i == cfg.grad_accum - 1):
                    loss = objective.loss(net, batch, cfg.precision)
                    scaler.scale(loss / cfg.grad_accum).backward()
                total += loss.detach() / cfg.grad_accum
            total = distributed.mean(total)  # the same on every process, so all of them stop here together
            if not math.isfinite(total):
                raise TrainingDiverged(f"loss is {total} at step {state.step + 1}; last good checkpoint kept")
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scale = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            tokens = tokens_per_step(cfg)
            record = {"step": state.step, "loss": total, "lr": optimizer.param_groups[0]["lr"],
                      "tokens_per_s": tokens / (time.perf_counter() - t0)}  # fmt: skip
            if scale is not None and scaler.get_scale() < scale:  # fp16: inf/NaN gradients, update skipped
                record["overflow"] = True
            last = (
                state.step == cfg.steps
                or (stop_after is not None and state.step - start_step >= stop_after)
                or distributed.any_process(should_stop is not None and should_stop())
            )
            if state.step % cfg.eval_every == 0 or last:
                record.update(evaluate(model, valid_data, cfg))
            state.history.append(record)
            if on_step is not None and distributed.is_main():
                on_step(record, state)
            if state.step % cfg.save_every == 0 or last:
                save_checkpoint(run_dir, model, optimizer, sampler, state, cfg, vocab, scaler)
            if last:
                break
        distributed.barrier()  # every process returns once the last checkpoint is written
        return state
