"""``reformer eval``: bits per token of a language model, or the accuracy of a classifier or a
masked language model, on a validation split (by default what its training validated on)."""

from __future__ import annotations

import argparse

from .options import UsageError, add_checkpoint_arguments, device_type, int_at_least


def add_parser(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    e = subparsers.add_parser("eval", help="bits per token (or accuracy) on a validation split", formatter_class=fmt)
    add_checkpoint_arguments(e)
    e.add_argument("--data", default=None,
                   help="builtin, pysrc, a file path, enwik8:PATH, or duplication; for a classifier labelled "
                        "documents (see reformer train --task classify) (default: the run's data, else "
                        "builtin)")  # fmt: skip
    e.add_argument("--seq-len", type=int_at_least(1), default=None,
                   help="window length (default: the run's --seq-len, else the model's max)")  # fmt: skip
    e.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="windows per batch (default: the run's --batch-size, else 2)")  # fmt: skip
    e.add_argument("--batches", type=int_at_least(1), default=None,
                   help="batches to average (default: a classifier's whole validation split; else those of "
                        "the run's validation, else 4)")  # fmt: skip
    e.add_argument("--device", type=device_type, default="cpu", help="cpu or cuda")
    e.add_argument("--n-hashes", type=int_at_least(1), default=None,
                   help="evaluate with LSH attention of this many hashing rounds (also a model trained "
                        "with full attention; default: as trained)")  # fmt: skip
    e.add_argument("--full-attention", action="store_true",
                   help="evaluate with dense shared-QK attention instead of LSH (same weights)")  # fmt: skip
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..model import TokenModel
    from ..runs import read_settings
    from ..switch import switch_attention
    from ..train import TrainConfig, evaluate, load_trainer_state, objective_for
    from .loading import data_identity, load_for_inference, load_training_data, objective_of, read_labels

    if args.full_attention and args.n_hashes is not None:
        raise UsageError("--n-hashes and --full-attention exclude each other (full attention does not hash)")
    model, vocab, ckpt = load_for_inference(args.checkpoint, args.device, args.revision, kind=TokenModel)
    objective = objective_of(type(model).__name__)
    switched = ""
    if args.full_attention or args.n_hashes is not None:  # in memory only: the checkpoint is not changed
        switch_attention(model, n_hashes=args.n_hashes, full_attention=args.full_attention)
        switched = "; full attention" if args.full_attention else f"; LSH with {args.n_hashes} hashes"
    trainer = load_trainer_state(ckpt) if (ckpt / "trainer.pt").is_file() else None
    trained = trainer["train_config"] if trainer else {}
    run_data = (read_settings(ckpt.parent.parent) or {}).get("data") if trainer else None
    # by default the windows training validated on (same length, count, seed), so the figures compare
    if objective == "classify" and not (args.data or run_data):
        raise UsageError(f"{ckpt} is a classifier without its run: give --data (labelled documents)")
    data = args.data or run_data or "builtin"
    seq_len = min(args.seq_len or trained.get("seq_len") or model.config.max_seq_len, model.config.max_seq_len)
    batch_size = args.batch_size or trained.get("batch_size", 2)
    labels = read_labels(ckpt, model.config) if objective == "classify" else None
    corpus = load_training_data(data, vocab, seq_len, batch_size, 0, labels)
    # a classifier scores each validation document of this --data once (with or without the run's state)
    covering = -(-len(corpus.valid) // batch_size) if objective == "classify" else None
    batches = args.batches or covering or trained.get("eval_batches", 4)
    cfg = TrainConfig(seq_len=seq_len, batch_size=batch_size, eval_batches=batches, seed=trained.get("seed", 0),
                      objective=objective)  # fmt: skip
    try:
        objective_for(cfg, model.config).sampler(corpus.valid, cfg, seed=0, evaluation=True)
    except ValueError as exc:
        raise UsageError(f"the validation split of --data {data}: {exc}") from None
    result = evaluate(model, corpus.valid, cfg)
    unlike = _unlike_training(trainer, cfg, data_identity(data), run_data, switched)
    print(f"{ckpt}: {_figures(result, objective, cfg, data)}{switched}){unlike}")
    return 0


def _figures(result: dict, objective: str, cfg, data: str) -> str:
    """The evaluation's figures and what they scored (up to the closing parenthesis)."""
    if objective == "classify":
        scored = f"{cfg.eval_batches} x {cfg.batch_size} documents of up to {cfg.seq_len} tokens in order, of {data}"
        return f"validation accuracy {result['eval_accuracy']:.2%}, loss {result['eval_loss']:.4f} nats ({scored}"
    windows = f"{cfg.eval_batches} x {cfg.batch_size} windows of {cfg.seq_len} tokens, seed {cfg.seed + 1}, of {data}"
    if objective == "mlm":
        return (f"validation masked-token accuracy {result['eval_accuracy']:.2%}, loss {result['eval_loss']:.4f} "
                f"nats/token ({windows}")  # fmt: skip
    return f"validation loss {result['eval_loss']:.4f} nats/token, {result['eval_bpc']:.4f} bits/token ({windows}"


def _unlike_training(trainer: dict | None, cfg, data: str, run_data: str | None, switched: str) -> str:
    """How this evaluation (``cfg``, a ``TrainConfig``) differs from the training run's last
    validation (empty if it does not)."""
    evals = [r for r in trainer["history"] if "eval_loss" in r] if trainer else []
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
    figure = (f"bpc {float(last['eval_bpc']):.4f}" if "eval_bpc" in last
              else f"accuracy {float(last['eval_accuracy']):.2%}")  # fmt: skip
    return (f"; not comparable with training's validation {figure} at step {last['step']}, "
            f"which scored other windows ({', '.join(differs)})")  # fmt: skip
