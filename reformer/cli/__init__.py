"""The ``reformer`` command: train, eval, generate, info, convert, reproduce, bench. The only package that reads argv.

One module per command, each with ``add_parser(subparsers)`` (its options) and ``run(args)``
(its exit code). A command module imports torch and the model inside ``run``, never at its top,
so that ``reformer --help``, ``reformer COMMAND --help`` and ``reformer --version`` answer at
once. Errors a user can cause (bad path, bad option, wrong checkpoint) print one line to
stderr and exit with code 2; progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__

#: The commands in the order ``--help`` lists them; ``reformer.cli.NAME`` implements ``reformer NAME``.
COMMANDS = ("train", "eval", "generate", "info", "convert", "reproduce", "bench")

#: What to lower when a command runs out of memory.
OUT_OF_MEMORY_ADVICE = {
    "train": "lower --batch-size (--grad-accum keeps the batch) or --seq-len",
    "eval": "lower --batch-size or --seq-len",
    "generate": "use a shorter --prompt or fewer --max-new-tokens",
    "reproduce": "lower --batch-size or --seq-len",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reformer", description="Train, evaluate and sample Reformer language models.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(sub)
    return p


def out_of_memory(exc: BaseException) -> bool:
    """True for a failed allocation: Python's, torch's (CUDA, our CPU pool) or torch's default CPU allocator's."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _refuse(command: str, message: str) -> int:
    print(f"reformer {command}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # OSError: e.g. a full disk while saving
        return _refuse(args.command, str(exc))
    except (MemoryError, RuntimeError) as exc:
        from ..train import TrainingDiverged  # a RuntimeError (imported here: see the module's docstring)

        if isinstance(exc, TrainingDiverged):
            return _refuse(args.command, str(exc))
        if not out_of_memory(exc):
            raise
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        advice = OUT_OF_MEMORY_ADVICE.get(args.command, "ask for less")
        return _refuse(args.command, f"out of memory ({detail}); {advice}")
