"""The ``reformer`` command: train, eval, generate, info, convert, reproduce, bench. The only module that reads argv.

Errors a user can cause (bad path, bad option, wrong checkpoint) print one line to stderr
and exit with code 2; progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import distributed, longctx, reproduce
from .allocator import keep_freed_memory
from .atomic import atomic_write
from .checkpoint import read_config, verify_manifest
from .config import ReformerConfig
from .data import ByteVocab, CharVocab, Corpus, DuplicationTask, load_corpus, vocab_from_dict
from .generate import stream
from .model import ReformerLM
from .presets import PRESETS
from .runs import check_not_in_use, check_out_dir, read_settings, run_lock, setting_differences, write_settings
from .switch import switch_attention
from .train import (
    TrainConfig,
    TrainingDiverged,
    TrainState,
    batch_source,
    checkpoint_dirs,
    evaluate,
    load_trainer_state,
    train,
)  # fmt: skip


class UsageError(ValueError):
    """A problem with what the user asked for."""


#: ``benchmarks/`` of the source checkout this package runs from; a wheel does not ship it.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARK_SCRIPTS = ("training", "attention", "generate", "profile_attention", "bucket_recall", "page_faults")


def int_at_least(minimum: int, maximum: int | None = None):
    """argparse ``type=``: an int >= ``minimum`` (and <= ``maximum``); argparse names the option in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


#: ``--seed``: what ``torch.manual_seed`` takes everywhere, an int64.
seed_type = int_at_least(-(2**63), 2**63 - 1)


def float_in(low: float, high: float = float("inf"), *, low_open: bool = False):
    """argparse ``type=``: a float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if not (value > low if low_open else value >= low) or value > high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value:g}")
        return value

    return parse


def device_type(text: str) -> str:
    """argparse ``type=``: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, present on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (no GPU, or a CPU-only torch)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def check_backend_runs(config: ReformerConfig, device: str) -> None:
    """Refuse a config whose ``attn_backend`` cannot run here, before any work."""
    if config.attn_backend != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise UsageError("the model's attn_backend 'triton' needs the triton package (pip install 'reformer-torch"
                         "[gpu]'); set attn_backend to 'auto' in its config.json to run without")  # fmt: skip
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"the model's attn_backend 'triton' needs --device cuda (got {device}); set attn_backend "
                         "to 'auto' in its config.json to run here")  # fmt: skip


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    found = checkpoint_dirs(p)
    if found:
        return found[-1]
    raise FileNotFoundError(f"no checkpoint at {path} (expected a run directory or a checkpoint directory)")


def read_vocab(ckpt: Path) -> ByteVocab | CharVocab:
    """A checkpoint's vocabulary (``vocab.json``; bytes when there is none)."""
    path = ckpt / "vocab.json"
    if not path.is_file():
        return ByteVocab()
    try:
        return vocab_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"corrupt {path}: {exc}") from None


def check_vocab(ckpt: Path, vocab: ByteVocab | CharVocab, config: ReformerConfig) -> None:
    if vocab.num_tokens != config.num_tokens:
        raise UsageError(f"{ckpt}: the model has {config.num_tokens} tokens but its vocabulary {vocab.num_tokens}")


def load_for_inference(path: str, device: str) -> tuple[ReformerLM, ByteVocab | CharVocab, Path]:
    ckpt = resolve_checkpoint(path)
    check_backend_runs(read_config(ckpt)[1], device)
    model = ReformerLM.from_pretrained(ckpt).to(device).eval()
    vocab = read_vocab(ckpt)
    check_vocab(ckpt, vocab, model.config)
    return model, vocab, ckpt


def load_training_data(
    spec: str, vocab: str | ByteVocab | CharVocab, seq_len: int, batch_size: int, seed: int
) -> Corpus:
    """A corpus (``builtin``, ``pysrc``, a file, ``enwik8:PATH``) or the synthetic ``duplication``
    task (sequences ``0w0w`` of ``seq_len`` bytes; only the second ``w`` is scored). ``vocab``: a
    kind, or a checkpoint's vocabulary, which then encodes the data."""
    if spec != "duplication":
        return load_corpus(spec, vocab=vocab)
    if (vocab if isinstance(vocab, str) else vocab.kind) != "byte":
        raise UsageError("the duplication task uses byte tokens: drop --vocab")
    task = DuplicationTask(seq_len, batch_size, n_symbols=255, seed=seed)
    return Corpus("duplication", task, task, ByteVocab())


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["loss"] / 0.6931471805599453 for r in history], label="train (bits/token)", alpha=0.6)
    evals = [r for r in history if "eval_bpc" in r]
    ax.plot([r["step"] for r in evals], [r["eval_bpc"] for r in evals], "o-", label="validation bpc")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:  # a failed write (a full disk) names the file, as the checkpoints' do
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


class _Progress:
    """Rank 0's report of a training run: progress bar, ``log.csv``, TensorBoard, ``loss.png``."""

    FIELDS = ["step", "loss", "lr", "tokens_per_s", "eval_loss", "eval_bpc", "overflow"]

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
        self.bar.set_postfix(post)
        if "eval_bpc" in record:  # the curve is redrawn at each evaluation
            _plot(state.history, self.run / "loss.png")
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


def cmd_train(args: argparse.Namespace) -> int:
    keep_freed_memory()  # CPU steps reuse their memory instead of faulting in fresh pages
    device = distributed.setup(args.device, args.dist_timeout)  # one process of a torchrun job, or the only one
    try:
        return _train(args, device)
    finally:
        distributed.shutdown()


#: Settings that define a run, with their flags: ``--resume`` must be given the run's values ...
RUN_IDENTITY = {"data": "--data", "vocab": "--vocab", "preset": "--preset", "seq_len": "--seq-len", "seed": "--seed"}
#: ... and these too, unless ``--allow-change`` says that a change is deliberate.
RUN_SCHEDULE = {"steps": "--steps", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "lr": "--lr",
                "warmup": "--warmup", "schedule": "--schedule", "precision": "--precision"}  # fmt: skip


def data_identity(spec: str) -> str:
    """``--data`` as stored in ``run.json``: file paths made absolute."""
    if spec in ("builtin", "duplication"):
        return spec
    prefix = "enwik8:" if spec.startswith("enwik8:") else ""
    return prefix + str(Path(spec[len(prefix) :]).resolve())


def run_settings(args: argparse.Namespace) -> dict:
    return {k: data_identity(args.data) if k == "data" else getattr(args, k) for k in [*RUN_IDENTITY, *RUN_SCHEDULE]}


def stored_settings(run: Path, trainer: dict, vocab: ByteVocab | CharVocab) -> dict:
    """The run's settings: ``run.json``, or for a run without one (older versions) what its
    checkpoint records."""
    stored = read_settings(run)
    if stored is not None:
        return stored
    trained = trainer.get("train_config", {})
    names = {"warmup": "warmup_steps"}
    return {"vocab": vocab.kind, **{k: trained[names.get(k, k)] for k in [*RUN_IDENTITY, *RUN_SCHEDULE]
                                     if names.get(k, k) in trained}}  # fmt: skip


def check_same_run(run: Path, step: int, stored: dict, settings: dict, allow_change: bool) -> None:
    """Refuse a ``--resume`` that would not continue the stored run, listing the differences."""
    if settings["steps"] <= step:
        raise UsageError(f"--steps {settings['steps']}: the run in {run} is already at step {step}; "
                         "pass a larger --steps (with --allow-change) to train further")  # fmt: skip
    flags = {**RUN_IDENTITY, **RUN_SCHEDULE}
    fixed = setting_differences(stored, {k: settings[k] for k in RUN_IDENTITY}, flags)
    changed = setting_differences(stored, {k: settings[k] for k in RUN_SCHEDULE}, flags)
    if fixed:
        raise UsageError(f"--resume: {run} is another run: {'; '.join(fixed + changed)}")
    if changed and not allow_change:
        raise UsageError(f"--resume: {run} was trained with other settings: {'; '.join(changed)}; "
                         "pass --allow-change to continue it with these")  # fmt: skip


def _train(args: argparse.Namespace, device: str) -> int:
    run = Path(args.out)
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
        _, config = read_config(latest)
        check_vocab(latest, vocab, config)
        check_same_run(run, trainer["step"], stored_settings(run, trainer, vocab), settings, args.allow_change)
        resume_step = trainer["step"]
    else:
        if args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
        vocab, config, resume_step = args.vocab, PRESETS[args.preset](max_seq_len=args.seq_len), 0
    corpus = load_training_data(args.data, vocab, args.seq_len, args.batch_size, args.seed)
    if latest is None:
        config.num_tokens = corpus.vocab.num_tokens
    if args.seq_len > config.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    check_backend_runs(config, device)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup, schedule=args.schedule, precision=args.precision, eval_every=args.eval_every,
        save_every=args.save_every, keep_last=args.keep_last, seed=args.seed, fsdp=args.fsdp,
    )  # fmt: skip
    for split, data in (("training", corpus.train), ("validation", corpus.valid)):  # fail before writing
        try:
            batch_source(data, cfg, seed=0)
        except ValueError as exc:
            raise UsageError(f"the {split} split of --data {args.data}: {exc}") from None
    torch.manual_seed(args.seed)
    model = ReformerLM(config=ReformerConfig.from_dict(config.to_dict())).to(device)
    if not distributed.is_main():
        _run_training(args, run, model, corpus, cfg, None)
        return 0
    with run_lock(run):
        write_settings(run, settings)
        n_params = sum(p.numel() for p in model.parameters())
        sizes = (
            "synthetic"
            if isinstance(corpus.train, DuplicationTask)
            else f"{len(corpus.train):,} train / {len(corpus.valid):,} valid tokens"
        )
        procs = f"; {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
        print(f"{corpus.name}: {sizes}; model {n_params / 1e6:.2f}M parameters; run dir {run}{procs}", file=sys.stderr)
        progress = _Progress(run, cfg.steps, resume_step)
        return _run_training(args, run, model, corpus, cfg, progress)


#: Exit codes of a run stopped by a signal (after its checkpoint), as a shell reports a killed
#: command: 128 + the signal; SIGHUP (a closed terminal) is reported as a termination.
INTERRUPTED_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 143}


def _run_training(args, run: Path, model, corpus: Corpus, cfg: TrainConfig, progress: _Progress | None) -> int:
    """Train until done or a signal, then (rank 0) print the summary; the exit code."""
    received: list[int] = []

    def on_signal(signum, frame):  # finish the step, save, exit
        received.append(signum)

    # SIGTERM: torchrun (on Ctrl-C) and job schedulers send it, then SIGKILL 30 s later; SIGHUP: the terminal closed
    previous = {sig: signal.signal(sig, on_signal) for sig in INTERRUPTED_EXIT}
    start = time.perf_counter()
    try:
        state = train(
            model, corpus.train, corpus.valid, cfg, run, resume=args.resume,
            should_stop=lambda: bool(received), on_step=progress, vocab=corpus.vocab.to_dict(),
        )  # fmt: skip
    finally:
        if progress is not None:
            progress.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = INTERRUPTED_EXIT[received[0]] if received else 0
    if progress is None:
        return code
    seconds = time.perf_counter() - start
    evals = [r for r in state.history if "eval_bpc" in r]
    first, last = evals[0], evals[-1]
    trained = len(progress.history) * cfg.grad_accum * cfg.batch_size * cfg.seq_len * distributed.world_size()
    verb = "interrupted at" if received else "finished"
    print(f"{verb} step {state.step}: validation bpc {first['eval_bpc']:.3f} (step {first['step']}) -> "
          f"{last['eval_bpc']:.3f} (step {last['step']}); {trained / seconds:,.0f} tokens/s "
          f"({trained:,} tokens in {seconds:.0f} s); checkpoint {checkpoint_dirs(run)[-1]}")  # fmt: skip
    if progress.overflows:
        skipped = progress.overflows
        print(f"fp16: {len(skipped)} step(s) skipped for gradient overflow: {skipped[:10]}", file=sys.stderr)
    return code


def cmd_eval(args: argparse.Namespace) -> int:
    if args.full_attention and args.n_hashes is not None:
        raise UsageError("--n-hashes and --full-attention exclude each other (full attention does not hash)")
    model, vocab, ckpt = load_for_inference(args.checkpoint, args.device)
    switched = ""
    if args.full_attention or args.n_hashes is not None:  # in memory only: the checkpoint is not changed
        switch_attention(model, n_hashes=args.n_hashes, full_attention=args.full_attention)
        switched = "; full attention" if args.full_attention else f"; LSH with {args.n_hashes} hashes"
    trainer = load_trainer_state(ckpt) if (ckpt / "trainer.pt").is_file() else None
    trained = trainer["train_config"] if trainer else {}
    run_data = (read_settings(ckpt.parent.parent) or {}).get("data") if trainer else None
    # by default the windows training validated on (same length, count, seed), so the figures compare
    data = args.data or run_data or "builtin"
    seq_len = min(args.seq_len or trained.get("seq_len") or model.config.max_seq_len, model.config.max_seq_len)
    batch_size = args.batch_size or trained.get("batch_size", 2)
    batches = args.batches or trained.get("eval_batches", 4)
    cfg = TrainConfig(seq_len=seq_len, batch_size=batch_size, eval_batches=batches, seed=trained.get("seed", 0))
    corpus = load_training_data(data, vocab, seq_len, cfg.batch_size, 0)
    try:
        batch_source(corpus.valid, cfg, seed=0)
    except ValueError as exc:
        raise UsageError(f"the validation split of --data {data}: {exc}") from None
    result = evaluate(model, corpus.valid, cfg)
    windows = f"{batches} x {batch_size} windows of {seq_len} tokens, seed {cfg.seed + 1}, of {data}{switched}"
    unlike = _unlike_training(trainer, cfg, data_identity(data), run_data, switched)
    print(f"{ckpt}: validation loss {result['eval_loss']:.4f} nats/token, {result['eval_bpc']:.4f} bits/token "
          f"({windows}){unlike}")  # fmt: skip
    return 0


def _unlike_training(trainer: dict | None, cfg: TrainConfig, data: str, run_data: str | None, switched: str) -> str:
    """How this evaluation differs from the training run's last validation (empty if it does not)."""
    evals = [r for r in trainer["history"] if "eval_bpc" in r] if trainer else []
    if not evals:
        return ""
    trained = trainer["train_config"]
    ours = {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "eval_batches": cfg.eval_batches}
    differs = [f"{k} {trained.get(k)}" for k, v in ours.items() if trained.get(k) != v]
    if run_data is not None and run_data != data:
        differs.append(f"data {run_data}")
    if trained.get("precision", "fp32") != "fp32":
        differs.append(f"precision {trained['precision']}")
    if switched:
        differs.append("the trained attention")
    if not differs:
        return ""
    last = evals[-1]
    return (f"; not comparable with training's validation bpc {float(last['eval_bpc']):.4f} at step {last['step']}, "
            f"which scored other windows ({', '.join(differs)})")  # fmt: skip


def cmd_reproduce(args: argparse.Namespace) -> int:
    keep_freed_memory()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    out = Path(args.out)
    sizes = dict(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    if args.experiment == "duplication":
        scale = reproduce.DUPLICATION_SCALES[args.scale]
        cfg = reproduce.with_overrides(scale, eval_batches=args.eval_batches, **sizes)
        print(reproduce.duplication_table(reproduce.run_duplication(cfg, out, args.device, progress)), end="")
    elif args.experiment == "longctx":
        return _reproduce_longctx(args, out, progress)
    else:
        lm = reproduce.LMConfig(data=args.data)
        cfg = reproduce.with_overrides(lm, eval_every=args.eval_every, variants=args.variants, **sizes)
        print(reproduce.lm_table(reproduce.run_lm(cfg, out, args.device, progress)), end="")
    return 0


def _reproduce_longctx(args: argparse.Namespace, out: Path, progress) -> int:
    if args.long and args.seq_len is not None:
        raise UsageError("--long and --seq-len exclude each other (--long is --seq-len 16384)")
    scale = longctx.LONGCTX_SCALES[args.scale]
    if args.long:
        scale = longctx.with_overrides(scale, seq_len=16_384, position_edges=longctx.LONG_POSITION_EDGES)
    cfg = longctx.with_overrides(scale, seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size,
                                 seed=args.seed, eval_windows=args.eval_windows)  # fmt: skip
    results = longctx.run_longctx(cfg, out, args.device, only=args.models, progress=progress)
    if args.publish is not None:
        longctx.publish(out, Path(args.publish))
    print(longctx.longctx_table(results), end="")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise UsageError("--prompt must not be empty")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # bytes of another encoding, which argv keeps as surrogates
        raise UsageError(f"--prompt is not UTF-8 text (a byte at character {exc.start}); give it in UTF-8") from None
    model, vocab, _ = load_for_inference(args.checkpoint, args.device)
    prompt = vocab.encode(args.prompt)[None].to(args.device)
    out = sys.stdout
    out.write(args.prompt)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if vocab.kind == "byte" else None
    tokens = stream(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)  # fmt: skip
    for token in tokens:
        t = int(token[0])
        out.write(decoder.decode(bytes([t])) if decoder else vocab.decode([t]))
        out.flush()
    out.write((decoder.decode(b"", final=True) if decoder else "") + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    ckpt = resolve_checkpoint(args.path)
    arch, config = read_config(ckpt)
    info = {"checkpoint": str(ckpt), "architecture": arch}
    if (ckpt / "trainer.pt").is_file():
        state = load_trainer_state(ckpt)
        evals = [r["eval_bpc"] for r in state["history"] if "eval_bpc" in r]
        info.update(step=state["step"], best_eval_bpc=min(evals) if evals else None)
    with torch.device("meta"):
        info["parameters"] = sum(p.numel() for p in ReformerLM(config=config).parameters())
    info["config"] = config.to_dict()
    print(json.dumps(info, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import from_transformers

    out = Path(args.out)
    if (out / "config.json").exists():
        raise UsageError(f"{out} already holds a checkpoint; choose another --out")
    try:
        model = from_transformers(args.from_transformers, byte_vocab=args.byte_vocab)
    except (ImportError, OSError) as exc:  # transformers missing, or an unreadable checkpoint
        raise UsageError(str(exc).strip().splitlines()[0]) from None
    model.float().save_pretrained(out)
    cfg = model.config
    kind = "causal" if cfg.causal else "masked"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{out}: ReformerLM ({kind}, {cfg.depth} layers {'/'.join(cfg.layer_kinds())}, {cfg.num_tokens} tokens, "
          f"{n_params / 1e6:.2f}M parameters)")  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``SCRIPT.py`` of the benchmarks directory with this interpreter; its exit code is ours."""
    script = Path(args.scripts_dir) / f"{args.script}.py"
    if not script.is_file():
        raise UsageError(
            f"{script} not found: the benchmark scripts are not part of the installed package; run from a "
            "clone of the repository (pip install -e '.[bench]') or pass --scripts-dir"
        )
    return subprocess.run([sys.executable, str(script), *args.args]).returncode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reformer", description="Train, evaluate and sample Reformer language models.")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser("train", help="train a language model", formatter_class=fmt)
    t.add_argument(
        "--data", default="builtin", help="builtin or pysrc (no download), a file path, enwik8:PATH, or duplication"
    )
    t.add_argument("--vocab", choices=("byte", "char"), default="byte", help="token vocabulary")
    t.add_argument("--preset", default="tiny", help=f"model size: {', '.join(PRESETS)}")
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
    t.add_argument("--save-every", type=int_at_least(1), default=50, help="checkpoint every N steps")
    t.add_argument("--keep-last", type=int_at_least(1), default=3, help="checkpoints to keep")
    t.add_argument("--out", default="runs/latest", help="run directory (checkpoints, log.csv, loss.png, tensorboard/)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (with the same settings)")
    t.add_argument("--allow-change", action="store_true",
                   help="with --resume: continue with other --steps, --lr, --batch-size, --grad-accum, --warmup, "
                        "--schedule or --precision than the run's (--data, --vocab, --preset, --seq-len and "
                        "--seed never change)")  # fmt: skip
    t.add_argument(
        "--device",
        type=device_type,
        default="cpu",
        help="cpu or cuda (under torchrun: each process its LOCAL_RANK GPU)",
    )
    t.add_argument("--seed", type=seed_type, default=0, help="random seed")
    t.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP",
    )
    t.add_argument("--dist-timeout", type=float_in(0, 1e9, low_open=True), default=600,
                   help="under torchrun: seconds a process waits for the others before failing")  # fmt: skip
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="bits per token on a validation split", formatter_class=fmt)
    e.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    e.add_argument(
        "--data",
        default=None,
        help="builtin, pysrc, a file path, enwik8:PATH, or duplication (default: the run's data, else builtin)",
    )
    e.add_argument(
        "--seq-len",
        type=int_at_least(1),
        default=None,
        help="window length (default: the run's --seq-len, else the model's max)",
    )
    e.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="windows per batch (default: the run's --batch-size, else 2)",
    )
    e.add_argument(
        "--batches",
        type=int_at_least(1),
        default=None,
        help="batches to average (default: those of the run's validation, else 4)",
    )
    e.add_argument("--device", type=device_type, default="cpu", help="cpu or cuda")
    e.add_argument("--n-hashes", type=int_at_least(1), default=None,
                   help="evaluate with LSH attention of this many hashing rounds (also a model trained "
                        "with full attention; default: as trained)")  # fmt: skip
    e.add_argument("--full-attention", action="store_true",
                   help="evaluate with dense shared-QK attention instead of LSH (same weights)")  # fmt: skip
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample a continuation of a prompt", formatter_class=fmt)
    g.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int_at_least(0), default=200, help="tokens to sample")
    g.add_argument("--temperature", type=float_in(0), default=0.8, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-k", type=int_at_least(1), default=None, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=0.95, help="nucleus sampling mass")
    g.add_argument("--seed", type=seed_type, default=None, help="random seed")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    g.add_argument("--device", type=device_type, default="cpu", help="cpu or cuda")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a run or checkpoint", formatter_class=fmt)
    i.add_argument("path", help="run or checkpoint directory")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert a Hugging Face transformers Reformer checkpoint", formatter_class=fmt)
    c.add_argument("--from-transformers", required=True, metavar="DIR",
                   help="directory of a transformers ReformerModelWithLMHead or ReformerForMaskedLM")  # fmt: skip
    c.add_argument("--out", required=True, help="checkpoint directory to write (config.json, model.safetensors)")
    c.add_argument("--byte-vocab", action="store_true",
                   help="258-token byte model (google/reformer-enwik8, id = byte + 2): keep the byte ids")  # fmt: skip
    c.set_defaults(func=cmd_convert)

    r = sub.add_parser("reproduce", help="the paper's experiments (see docs/reproduction.md)", formatter_class=fmt)
    experiments = r.add_subparsers(dest="experiment", required=True)
    dup = experiments.add_parser("duplication", help="duplication task, paper Table 2", formatter_class=fmt)
    dup.add_argument("--scale", choices=("cpu", "paper"), default="cpu",
                     help="cpu: length 256, ~1 hour on 2 cores; paper: length 1024, 150K steps (GPU)")  # fmt: skip
    dup.add_argument("--out", default="runs/duplication", help="output directory (table, JSON, one run per model)")
    dup.add_argument("--eval-batches", type=int_at_least(1), default=None, help="batches per accuracy (override)")
    lm = experiments.add_parser("lm", help="language modelling: full vs LSH bits per byte", formatter_class=fmt)
    lm.add_argument("--data", default="builtin", help="builtin, pysrc, enwik8:PATH, or a file path")
    lm.add_argument("--out", default="runs/lm", help="output directory (table, JSON, PNG, one run per model)")
    lm.add_argument("--eval-every", type=int_at_least(1), default=None, help="steps between curve points (override)")
    lm.add_argument("--variants", nargs="+", default=None,
                    help="models to train: full, lsh-N, transformer, transformer-shared-qk (default: all "
                         "of full lsh-1 lsh-2 lsh-4 lsh-8 transformer transformer-shared-qk)")  # fmt: skip
    lc = experiments.add_parser("longctx", help="far context: dense vs LSH vs local attention on pysrc",
                                formatter_class=fmt)  # fmt: skip
    lc.add_argument(
        "--scale",
        choices=sorted(longctx.LONGCTX_SCALES),
        default="cpu",
        help="cpu: the 2-core study (docs/long-context.md); pilot: minutes per model; gpu: larger",
    )
    lc.add_argument("--long", action="store_true", help="context 16,384 instead of 4,096")
    lc.add_argument("--models", nargs="+", default=None, choices=longctx.ALL_MODELS, metavar="MODEL",
                    help="train (or resume) only these models now; the results cover every finished model "
                         f"(default: all of {' '.join(longctx.ALL_MODELS)})")  # fmt: skip
    lc.add_argument("--out", default="runs/longctx", help="output directory (results, one run per model)")
    lc.add_argument(
        "--eval-windows",
        type=int_at_least(1),
        default=None,
        help="validation windows of the final evaluation (override)",
    )
    lc.add_argument(
        "--publish",
        default=None,
        metavar="DIR",
        help="also copy the results (JSON, Markdown, PNG) into DIR, e.g. docs/long-context",
    )
    for x in (dup, lm, lc):
        x.add_argument("--steps", type=int_at_least(1), default=None, help="training steps per model (override)")
        x.add_argument("--seq-len", type=int_at_least(4), default=None, help="sequence length (override)")
        x.add_argument("--batch-size", type=int_at_least(1), default=None, help="sequences per step (override)")
        x.add_argument("--seed", type=seed_type, default=None, help="random seed (override; default 0)")
        x.add_argument("--device", type=device_type, default="cpu", help="cpu or cuda")
    r.set_defaults(func=cmd_reproduce)

    b = sub.add_parser("bench", help="run a benchmark script of the source checkout", formatter_class=fmt)
    b.add_argument("--scripts-dir", default=str(BENCHMARKS_DIR), help="directory of the benchmark scripts")
    b.add_argument("script", choices=BENCHMARK_SCRIPTS, help="runs benchmarks/SCRIPT.py (tables and plots in docs/)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script, e.g. --lengths 1024 4096")
    b.set_defaults(func=cmd_bench)
    return p


#: What to lower when a command runs out of memory.
OUT_OF_MEMORY_ADVICE = {
    "train": "lower --batch-size (--grad-accum keeps the batch) or --seq-len",
    "eval": "lower --batch-size or --seq-len",
    "generate": "use a shorter --prompt or fewer --max-new-tokens",
    "reproduce": "lower --batch-size or --seq-len",
}


def out_of_memory(exc: BaseException) -> bool:
    """True for a failed allocation: Python's, torch's (CUDA, our CPU pool) or torch's default CPU allocator's."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, TrainingDiverged) as exc:  # OSError: e.g. a full disk while saving
        print(f"reformer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        advice = OUT_OF_MEMORY_ADVICE.get(args.command, "ask for less")
        print(f"reformer {args.command}: error: out of memory ({detail}); {advice}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
