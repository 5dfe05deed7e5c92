"""``reformer train``: train a language model (causal, or masked with ``--objective mlm``) or a
document classifier (``--task classify``), or resume a run (``--resume``)."""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path

from ..presets import PRESETS
from .options import UsageError, device_type, float_in, int_at_least, seed_type

#: Settings that define a run, with their flags: ``--resume`` must be given the run's values ...
RUN_IDENTITY = {"data": "--data", "vocab": "--vocab", "preset": "--preset", "init_from": "--init-from",
                "seq_len": "--seq-len", "seed": "--seed", "objective": "--task/--objective",
                "pooling": "--pooling"}  # fmt: skip
#: ... and these too, unless ``--allow-change`` says that a change is deliberate.
RUN_SCHEDULE = {"steps": "--steps", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "lr": "--lr",
                "warmup": "--warmup", "schedule": "--schedule", "precision": "--precision"}  # fmt: skip

#: Exit codes of a run stopped by a signal (after its checkpoint), as a shell reports a killed
#: command: 128 + the signal; SIGHUP (a closed terminal) is reported as a termination.
INTERRUPTED_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 143}


def add_parser(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = subparsers.add_parser("train", help="train a language model or a classifier", formatter_class=fmt)
    t.add_argument("--task", choices=("lm", "classify"), default="lm",
                   help="lm: a language model; classify: a document classifier (see --data)")  # fmt: skip
    t.add_argument("--objective", choices=("causal", "mlm"), default="causal",
                   help="--task lm: next-token prediction (causal) or masked-token prediction "
                        "(mlm, bidirectional)")  # fmt: skip
    t.add_argument("--data", default="builtin",
                   help="--task lm: builtin or pysrc (no download), a file path, enwik8:PATH, or duplication; "
                        "--task classify: a label<TAB>text file, a folder with a sub-folder per label, or "
                        "listops[:N] (generated)")  # fmt: skip
    t.add_argument("--vocab", choices=("byte", "char"), default=None,
                   help="token vocabulary (default: byte; listops has its own)")  # fmt: skip
    t.add_argument("--pooling", choices=("first", "last", "mean", "max"), default="mean",
                   help="--task classify: how a document's positions become one vector")  # fmt: skip
    t.add_argument("--preset", default=None, help=f"model size: {', '.join(PRESETS)} (default: tiny)")
    t.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (a run or checkpoint directory, or a Hub repo id), "
                        "with its architecture and vocabulary instead of --preset and --vocab; a head the "
                        "task adds starts fresh, e.g. a classifier from a masked LM (--objective mlm)")  # fmt: skip
    t.add_argument(
        "--seq-len", type=int_at_least(1), default=2048, help="tokens per training sequence (also the model's max)"
    )
    t.add_argument("--batch-size", type=int_at_least(1), default=4, help="sequences per micro-batch")
    t.add_argument("--grad-accum", type=int_at_least(1), default=1, help="micro-batches per optimizer step")
    t.add_argument("--steps", type=int_at_least(1), default=300, help="optimizer steps in the whole run")
    t.add_argument("--lr", type=float_in(0, low_open=True), default=2e-3, help="peak learning rate")
    t.add_argument("--warmup", type=int_at_least(0), default=30, help="warm-up steps")
    t.add_argument("--schedule", choices=("cosine", "rsqrt", "constant"), default="cosine", help="learning-rate decay")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="compute precision")
    t.add_argument("--eval-every", type=int_at_least(1), default=50, help="evaluate every N steps")
    t.add_argument("--eval-batches", type=int_at_least(1), default=None,
                   help="batches per evaluation (default: --task classify the whole validation split, "
                        "else 4)")  # fmt: skip
    t.add_argument("--save-every", type=int_at_least(1), default=50, help="checkpoint every N steps")
    t.add_argument("--keep-last", type=int_at_least(1), default=3, help="checkpoints to keep")
    t.add_argument("--out", default="runs/latest", help="run directory (checkpoints, log.csv, loss.png, tensorboard/)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (with the same settings)")
    t.add_argument("--allow-change", action="store_true",
                   help="with --resume: continue with other --steps, --lr, --batch-size, --grad-accum, --warmup, "
                        "--schedule or --precision than the run's (--data, --vocab, --preset, --init-from, "
                        "--seq-len and --seed never change)")  # fmt: skip
    t.add_argument("--device", type=device_type, default="cpu",
                   help="cpu or cuda (under torchrun: each process its LOCAL_RANK GPU)")  # fmt: skip
    t.add_argument("--seed", type=seed_type, default=0, help="random seed")
    t.add_argument(
        "--compile",
        action="store_true",
        help="train through torch.compile (the first step compiles the model: up to minutes)",
    )
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) "
                        "instead of DDP")  # fmt: skip
    t.add_argument("--dist-timeout", type=float_in(0, 1e9, low_open=True), default=600,
                   help="under torchrun: seconds a process waits for the others before failing")  # fmt: skip
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..native.allocator import keep_freed_memory

    keep_freed_memory()  # CPU steps reuse their memory instead of faulting in fresh pages
    device = distributed.setup(args.device, args.dist_timeout)  # one process of a torchrun job, or the only one
    try:
        return _train(args, device)
    finally:
        distributed.shutdown()


def run_settings(args: argparse.Namespace) -> dict:
    from .loading import checkpoint_identity, data_identity

    identity = {"data": data_identity(args.data), "init_from": checkpoint_identity(args.init_from)}
    return {k: identity[k] if k in identity else getattr(args, k) for k in [*RUN_IDENTITY, *RUN_SCHEDULE]}


def stored_settings(run: Path, trainer: dict, vocab_kind: str) -> dict:
    """The run's settings: ``run.json``, or for a run without one (older versions) what its
    checkpoint records."""
    from ..runs import read_settings

    stored = read_settings(run)
    if stored is not None:
        return stored
    trained = trainer.get("train_config", {})
    names = {"warmup": "warmup_steps"}
    return {"vocab": vocab_kind, **{k: trained[names.get(k, k)] for k in [*RUN_IDENTITY, *RUN_SCHEDULE]
                                    if names.get(k, k) in trained}}  # fmt: skip


def check_same_run(run: Path, step: int, stored: dict, settings: dict, allow_change: bool) -> None:
    """Refuse a ``--resume`` that would not continue the stored run, listing the differences."""
    from ..runs import setting_differences

    flags = {**RUN_IDENTITY, **RUN_SCHEDULE}
    fixed = setting_differences(stored, {k: settings[k] for k in RUN_IDENTITY}, flags)
    changed = setting_differences(stored, {k: settings[k] for k in RUN_SCHEDULE}, flags)
    if fixed:
        raise UsageError(f"--resume: {run} is another run: {'; '.join(fixed + changed)}")
    if settings["steps"] <= step:
        raise UsageError(f"--steps {settings['steps']}: the run in {run} is already at step {step}; "
                         "pass a larger --steps (with --allow-change) to train further")  # fmt: skip
    if changed and not allow_change:
        raise UsageError(f"--resume: {run} was trained with other settings: {'; '.join(changed)}; "
                         "pass --allow-change to continue it with these")  # fmt: skip


def _train(args: argparse.Namespace, device: str) -> int:
    import torch

    from .. import distributed
    from ..config import ReformerConfig
    from ..data import DuplicationTask
    from ..runs import run_lock, write_settings
    from ..train import MODEL_CLASSES
    from .dashboard import Dashboard

    run = Path(args.out)
    try:
        settings, config, corpus, cfg, resume_step, source = _checked_inputs(args, run, device)
        refusal = None
    except (ValueError, OSError) as exc:
        refusal = exc
    # Every process checks --out before rank 0 writes into it (a process that looked later would
    # find rank 0's lock file and refuse), and all refuse together instead of waiting on each other.
    if distributed.any_process(refusal is not None):
        raise refusal or UsageError("another process of the job refused the inputs (its error is above)")
    torch.manual_seed(args.seed)
    model = MODEL_CLASSES[cfg.objective](config=ReformerConfig.from_dict(config.to_dict()))
    transfer = model.init_from(source) if source is not None else None  # (every process alike)
    model = model.to(device)
    if not distributed.is_main():
        _run_training(args, run, model, corpus, cfg, None)
        return 0
    with run_lock(run):
        write_settings(run, settings)
        n_params = sum(p.numel() for p in model.parameters())
        unit = "documents" if cfg.objective == "classify" else "tokens"
        sizes = (
            "synthetic"
            if isinstance(corpus.train, DuplicationTask)
            else f"{len(corpus.train):,} train / {len(corpus.valid):,} valid {unit}"
        )
        procs = f"; {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
        print(f"{corpus.name}: {sizes}; model {n_params / 1e6:.2f}M parameters; run dir {run}{procs}", file=sys.stderr)
        if transfer is not None:
            print(f"initialised from {source}: {transfer.summary()}", file=sys.stderr)
        if cfg.compile:
            print("torch.compile: the first step compiles the model (it can take minutes)", file=sys.stderr)
        dashboard = Dashboard(run, cfg.steps, resume_step)
        return _run_training(args, run, model, corpus, cfg, dashboard)


def _checked_inputs(args: argparse.Namespace, run: Path, device: str):
    """Check --out, the resume, the data and the model before anything is written; return the
    run's settings, model config, corpus, training config, the step it starts from, and the
    checkpoint a new run takes its weights from (``--init-from``; else None)."""
    from ..checkpoint import WEIGHTS_NAME, read_config, read_meta, verify_manifest
    from ..runs import check_not_in_use, check_out_dir
    from ..train import MODEL_CLASSES, TrainConfig, checkpoint_dirs, load_trainer_state, objective_for
    from .loading import (
        check_backend_runs,
        check_vocab,
        load_training_data,
        objective_of,
        read_labels,
        read_vocab,
        resolve_checkpoint,
    )

    if args.init_from is not None and (args.preset is not None or args.vocab is not None):
        given = "--preset" if args.preset is not None else "--vocab"
        raise UsageError(f"{given} and --init-from exclude each other (the checkpoint fixes the model and its "
                         "vocabulary)")  # fmt: skip
    if args.init_from is None:
        args.preset, args.vocab = args.preset or "tiny", args.vocab or "byte"
    if args.task == "classify":
        if args.objective != "causal":
            raise UsageError("--objective applies to --task lm (a classifier learns its labels)")
        args.objective = "classify"
    check_out_dir(run)
    check_not_in_use(run)
    latest = checkpoint_dirs(run)[-1] if checkpoint_dirs(run) else None
    if latest is not None and not args.resume:
        raise UsageError(f"{run} already holds a run; pass --resume to continue it, or choose another --out")
    if latest is None and args.resume:
        raise UsageError(f"--resume: {run} holds no run to resume (no checkpoint); drop --resume to start one")
    settings = run_settings(args)
    if latest is not None:  # the run's own model and vocabulary, checked against what was asked
        verify_manifest(latest)  # a corrupt or altered file is named before anything is read
        trainer, vocab = load_trainer_state(latest), read_vocab(latest)
        architecture, config = read_config(latest)
        check_vocab(latest, vocab, config, objective_of(architecture))
        check_same_run(run, trainer["step"], stored_settings(run, trainer, vocab.kind), settings, args.allow_change)
        labels = read_labels(latest, config) if args.objective == "classify" else None
        resume_step, source = trainer["step"], None
    elif args.init_from is not None:  # the checkpoint's architecture and vocabulary; its weights in _train
        source = resolve_checkpoint(args.init_from)
        verify_manifest(source, needed=(WEIGHTS_NAME,))  # (a run's checkpoint from the Hub comes without trainer.pt)
        trainable = sorted(cls.__name__ for cls in MODEL_CLASSES.values())
        if read_meta(source)[0] not in trainable:
            raise UsageError(f"--init-from {args.init_from} holds a {read_meta(source)[0]}; a run starts from a "
                             f"checkpoint of {', '.join(trainable)}")  # fmt: skip
        vocab, (_, config), resume_step = read_vocab(source), read_config(source), 0
        labels = () if args.objective == "classify" else None
    else:
        if args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
        vocab, config, resume_step = args.vocab, PRESETS[args.preset](max_seq_len=args.seq_len), 0
        labels, source = (() if args.objective == "classify" else None), None
    corpus = load_training_data(args.data, vocab, args.seq_len, args.batch_size, args.seed, labels)
    if source is not None and _tokens(corpus.vocab) != _tokens(vocab):
        raise UsageError(f"--data {args.data} has its own vocabulary ({corpus.vocab.kind}), not the one of "
                         f"--init-from {args.init_from} ({vocab.kind})")  # fmt: skip
    if latest is None:
        new_model_config(config, corpus, args)
    if args.seq_len > config.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    check_backend_runs(config, device)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup, schedule=args.schedule, precision=args.precision, eval_every=args.eval_every,
        save_every=args.save_every, keep_last=args.keep_last, seed=args.seed, fsdp=args.fsdp, objective=args.objective,
        eval_batches=args.eval_batches or default_eval_batches(corpus, args), compile=args.compile,
        data_name=corpus.name,
    )  # fmt: skip
    objective = objective_for(cfg, config)
    for split, data in (("training", corpus.train), ("validation", corpus.valid)):  # fail before writing
        try:
            objective.sampler(data, cfg, seed=0, evaluation=split == "validation")
        except ValueError as exc:
            raise UsageError(f"the {split} split of --data {args.data}: {exc}") from None
    return settings, config, corpus, cfg, resume_step, source


def _tokens(vocab) -> dict:
    """A vocabulary's tokens as ``vocab.json`` describes them, without a classifier's labels."""
    return {k: v for k, v in vocab.to_dict().items() if k != "labels"}


def saved_vocab(corpus) -> dict:
    """What ``vocab.json`` holds: the vocabulary, and a classifier's label names in id order."""
    labels = getattr(corpus, "labels", None)
    return {**corpus.vocab.to_dict(), **({"labels": list(labels)} if labels else {})}


def headline(record: dict) -> str:
    """An evaluation's main figure: bits per token of a causal model, else accuracy."""
    return f"bpc {record['eval_bpc']:.3f}" if "eval_bpc" in record else f"accuracy {record['eval_accuracy']:.2%}"


def new_model_config(config, corpus, args: argparse.Namespace) -> None:
    """Fit a preset's (or an ``--init-from`` checkpoint's) ``config`` to the data and the
    objective: the vocabulary (and ``mlm``'s mask token), and for anything but next-token
    prediction a bidirectional model; a classifier's labels and pooling."""
    from .loading import model_tokens

    config.num_tokens = model_tokens(corpus.vocab, args.objective)
    config.causal = args.objective == "causal"  # (a checkpoint of --init-from may have had another objective)
    if args.objective == "classify":  # padding hashed into a bucket of its own: documents classify as unpadded
        config.num_labels, config.pooling, config.pad_bucket = len(corpus.labels), args.pooling, True


def default_eval_batches(corpus, args: argparse.Namespace) -> int:
    """A classifier's evaluation scores each document of its validation split once (the last
    batch is filled with repeats, which are not scored); a language model's scores 4 batches of
    random windows."""
    from .. import distributed

    if args.objective != "classify":
        return 4
    rows = args.batch_size * distributed.world_size()
    return -(-len(corpus.valid) // rows)


def _run_training(args, run: Path, model, corpus, cfg, dashboard) -> int:
    """Train until done or a signal, then (rank 0, which has the ``dashboard``) print the
    summary; the exit code."""
    from .. import distributed
    from ..train import checkpoint_dirs, tokens_per_step, train

    received: list[int] = []

    def on_signal(signum, frame):  # finish the step, save, exit
        received.append(signum)

    # SIGTERM: torchrun (on Ctrl-C) and job schedulers send it, then SIGKILL 30 s later; SIGHUP: the terminal closed
    previous = {sig: signal.signal(sig, on_signal) for sig in INTERRUPTED_EXIT}
    start = time.perf_counter()
    try:
        state = train(
            model, corpus.train, corpus.valid, cfg, run, resume=args.resume,
            should_stop=lambda: bool(received), on_step=dashboard, vocab=saved_vocab(corpus),
        )  # fmt: skip
    finally:
        if dashboard is not None:
            dashboard.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = INTERRUPTED_EXIT[received[0]] if received else 0
    if dashboard is None:
        return code
    seconds = time.perf_counter() - start
    evals = [r for r in state.history if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    trained = len(dashboard.history) * cfg.grad_accum * cfg.batch_size * cfg.seq_len * distributed.world_size()
    verb = "interrupted at" if received else "finished"
    print(f"{verb} step {state.step}: validation {headline(first)} (step {first['step']}) -> "
          f"{headline(last)} (step {last['step']}); {trained / seconds:,.0f} tokens/s "
          f"({trained:,} tokens in {seconds:.0f} s); checkpoint {checkpoint_dirs(run)[-1]}")  # fmt: skip
    if cfg.compile and len(dashboard.history) > 1:
        step_seconds = [tokens_per_step(cfg) / r["tokens_per_s"] for r in dashboard.history]
        print(f"torch.compile: first step {step_seconds[0]:.1f} s (compiling), then "
              f"{statistics.median(step_seconds[1:]):.2f} s per step", file=sys.stderr)  # fmt: skip
    if dashboard.overflows:
        skipped = dashboard.overflows
        print(f"fp16: {len(skipped)} step(s) skipped for gradient overflow: {skipped[:10]}", file=sys.stderr)
    return code
