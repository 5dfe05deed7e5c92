"""Reformer for PyTorch: LSH attention, reversible layers, chunked feed-forward.

The public names are imported on first use (PEP 562), so that ``import reformer.cli`` - and
``reformer --help`` - does not pay for importing torch."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("reformer-torch")
except PackageNotFoundError:  # run from a source tree that was not pip-installed
    __version__ = "unknown"

#: Public name -> the module that defines it.
_HOMES = {
    "FullQKAttention": "attention",
    "LSHAttention": "attention",
    "LSHSelfAttention": "attention",
    "ReformerConfig": "config",
    "Reformer": "model",
    "ReformerEncDec": "model",
    "ReformerLM": "model",
    "ReformerForMaskedLM": "heads",
    "ReformerForSequenceClassification": "heads",
    "Autopadder": "wrappers",
    "Recorder": "wrappers",
    "TrainingWrapper": "wrappers",
}

__all__ = [
    "Autopadder",
    "Recorder",
    "FullQKAttention",
    "LSHAttention",
    "LSHSelfAttention",
    "Reformer",
    "ReformerConfig",
    "ReformerEncDec",
    "ReformerForMaskedLM",
    "ReformerForSequenceClassification",
    "ReformerLM",
    "TrainingWrapper",
    "__version__",
]

if TYPE_CHECKING:
    from .attention import FullQKAttention, LSHAttention, LSHSelfAttention
    from .config import ReformerConfig
    from .heads import ReformerForMaskedLM, ReformerForSequenceClassification
    from .model import Reformer, ReformerEncDec, ReformerLM
    from .wrappers import Autopadder, Recorder, TrainingWrapper


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
