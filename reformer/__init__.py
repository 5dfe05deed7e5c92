"""Reformer for PyTorch: LSH attention, reversible layers, chunked feed-forward."""

from .attention import FullQKAttention, LSHAttention, LSHSelfAttention
from .config import ReformerConfig
from .heads import ReformerForMaskedLM, ReformerForSequenceClassification
from .model import Reformer, ReformerEncDec, ReformerLM
from .wrappers import Autopadder, Recorder, TrainingWrapper

__version__ = "0.1.0"

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
