"""``reformer reproduce``: the paper's experiments (duplication task, language modelling), the
far-context study and ListOps (see docs/reproduction.md, docs/long-context.md, docs/listops.md)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .options import UsageError, device_type, int_at_least, seed_type

# The names the options offer, spelled here because the studies' modules import torch (--help
# does not); tests/test_cli_startup.py checks them against reformer.reproduce and reformer.longctx.
#: ``reproduce.DUPLICATION_SCALES``
DUPLICATION_SCALES = ("cpu", "paper")
#: ``longctx.LONGCTX_SCALES``
LONGCTX_SCALES = ("cpu", "gpu", "pilot")
#: ``longctx.ALL_MODELS``
LONGCTX_MODELS = ("transformer", "full", "lsh-1", "lsh-2", "lsh-4", "lsh-8", "local")
#: ``listops.LISTOPS_SCALES``
LISTOPS_SCALES = ("cpu", "pilot")
#: ``listops.LISTOPS_MODELS``
LISTOPS_MODELS = ("lsh", "local", "transformer")


def add_parser(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    r = subparsers.add_parser("reproduce", help="the paper's experiments (see docs/reproduction.md)",
                              formatter_class=fmt)  # fmt: skip
    experiments = r.add_subparsers(dest="experiment", required=True)
    dup = experiments.add_parser("duplication", help="duplication task, paper Table 2", formatter_class=fmt)
    dup.add_argument("--scale", choices=DUPLICATION_SCALES, default="cpu",
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
    lc.add_argument("--scale", choices=LONGCTX_SCALES, default="cpu",
                    help="cpu: the 2-core study (docs/long-context.md); pilot: minutes per model; "
                         "gpu: larger")  # fmt: skip
    lc.add_argument("--long", action="store_true", help="context 16,384 instead of 4,096")
    lc.add_argument("--models", nargs="+", default=None, choices=LONGCTX_MODELS, metavar="MODEL",
                    help="train (or resume) only these models now; the results cover every finished model "
                         f"(default: all of {' '.join(LONGCTX_MODELS)})")  # fmt: skip
    lc.add_argument("--out", default="runs/longctx", help="output directory (results, one run per model)")
    lc.add_argument("--eval-windows", type=int_at_least(1), default=None,
                    help="validation windows of the final evaluation (override)")  # fmt: skip
    lc.add_argument("--publish", default=None, metavar="DIR",
                    help="also copy the results (JSON, Markdown, PNG) into DIR, e.g. docs/long-context")  # fmt: skip
    lo = experiments.add_parser("listops", help="ListOps (Long Range Arena): LSH vs local vs dense classifiers",
                                formatter_class=fmt)  # fmt: skip
    lo.add_argument("--scale", choices=LISTOPS_SCALES, default="cpu",
                    help="cpu: the proposed 2-core budget (docs/listops.md); pilot: minutes per model")  # fmt: skip
    lo.add_argument("--models", nargs="+", default=None, choices=LISTOPS_MODELS, metavar="MODEL",
                    help="train (or resume) only these models now; the results cover every finished model "
                         f"(default: all of {' '.join(LISTOPS_MODELS)})")  # fmt: skip
    lo.add_argument("--out", default="runs/listops", help="output directory (results, one run per model)")
    lo.add_argument("--publish", default=None, metavar="DIR",
                    help="also copy the results (JSON, Markdown, PNG) into DIR, e.g. docs/listops")  # fmt: skip
    for x in (dup, lm, lc, lo):
        x.add_argument("--steps", type=int_at_least(1), default=None, help="training steps per model (override)")
        x.add_argument("--seq-len", type=int_at_least(4), default=None, help="sequence length (override)")
        x.add_argument("--batch-size", type=int_at_least(1), default=None, help="sequences per step (override)")
        x.add_argument("--seed", type=seed_type, default=None, help="random seed (override; default 0)")
        x.add_argument("--device", type=device_type, default="cpu", help="cpu or cuda")
    r.set_defaults(func=run)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from .. import reproduce
    from ..native.allocator import keep_freed_memory

    keep_freed_memory()
    out = Path(args.out)
    sizes = dict(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    if args.experiment == "duplication":
        scale = reproduce.DUPLICATION_SCALES[args.scale]
        cfg = reproduce.with_overrides(scale, eval_batches=args.eval_batches, **sizes)
        print(reproduce.duplication_table(reproduce.run_duplication(cfg, out, args.device, _progress)), end="")
    elif args.experiment == "longctx":
        return _reproduce_longctx(args, out)
    elif args.experiment == "listops":
        return _reproduce_listops(args, out)
    else:
        lm = reproduce.LMConfig(data=args.data)
        cfg = reproduce.with_overrides(lm, eval_every=args.eval_every, variants=args.variants, **sizes)
        print(reproduce.lm_table(reproduce.run_lm(cfg, out, args.device, _progress)), end="")
    return 0


def study_command(args: argparse.Namespace) -> str:
    """The command that reproduces a whole study as ``args`` ran it: its scale and overrides,
    without ``--models`` (the results cover every finished model), recorded in the results."""
    words = ["reformer", "reproduce", args.experiment, "--scale", args.scale]
    if getattr(args, "long", False):
        words.append("--long")
    for option in ("seq_len", "steps", "batch_size", "seed", "eval_windows", "out", "publish"):
        value = getattr(args, option, None)
        if value is not None:
            words += ["--" + option.replace("_", "-"), str(value)]
    if args.device != "cpu":
        words += ["--device", args.device]
    return shlex.join(words)


def _reproduce_listops(args: argparse.Namespace, out: Path) -> int:
    from .. import listops

    cfg = listops.with_overrides(listops.LISTOPS_SCALES[args.scale], seq_len=args.seq_len, steps=args.steps,
                                 batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    results = listops.run_listops(cfg, out, args.device, only=args.models, progress=_progress,
                                  command=study_command(args))  # fmt: skip
    if args.publish is not None:
        listops.publish(out, Path(args.publish))
    print(listops.listops_table(results), end="")
    return 0


def _reproduce_longctx(args: argparse.Namespace, out: Path) -> int:
    from .. import longctx

    if args.long and args.seq_len is not None:
        raise UsageError("--long and --seq-len exclude each other (--long is --seq-len 16384)")
    scale = longctx.LONGCTX_SCALES[args.scale]
    if args.long:
        scale = longctx.with_overrides(scale, seq_len=16_384, position_edges=longctx.LONG_POSITION_EDGES)
    cfg = longctx.with_overrides(scale, seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size,
                                 seed=args.seed, eval_windows=args.eval_windows)  # fmt: skip
    results = longctx.run_longctx(cfg, out, args.device, only=args.models, progress=_progress,
                                  command=study_command(args))  # fmt: skip
    if args.publish is not None:
        longctx.publish(out, Path(args.publish))
    print(longctx.longctx_table(results), end="")
    return 0
