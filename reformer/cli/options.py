"""What the commands' options accept (argparse ``type=`` functions) and the error for a request
that cannot be served. Imports no torch at its top: the parsers are built for ``--help`` too."""

from __future__ import annotations

import argparse
import math


class UsageError(ValueError):
    """A problem with what the user asked for."""


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
    import torch  # a command that takes --device runs on torch anyway; --help does not get here

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


def add_checkpoint_arguments(parser) -> None:
    """``--checkpoint`` (a run, a checkpoint directory or a Hub repo id) and ``--revision``."""
    parser.add_argument("--checkpoint", required=True,
                        help="run or checkpoint directory, or a Hugging Face Hub repo id (org/name)")  # fmt: skip
    parser.add_argument("--revision", help="with a Hub repo id: its branch, tag or commit (default: main)")
