"""``reformer_pytorch.reformer_pytorch``'s names, for code written against that package."""

from .attention import FullQKAttention, LSHAttention, LSHSelfAttention
from .model import Reformer, ReformerLM

__all__ = ["FullQKAttention", "LSHAttention", "LSHSelfAttention", "Reformer", "ReformerLM"]
