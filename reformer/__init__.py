"""Reformer for PyTorch: LSH attention, reversible layers, chunked feed-forward."""

from .attention import FullQKAttention, LSHAttention, LSHSelfAttention
from .config import ReformerConfig

__version__ = "0.1.0"

__all__ = ["FullQKAttention", "LSHAttention", "LSHSelfAttention", "ReformerConfig", "__version__"]
