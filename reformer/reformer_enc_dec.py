"""``reformer_pytorch.reformer_enc_dec``'s names, for code written against that package."""

from .model import ReformerEncDec

__all__ = ["ReformerEncDec"]
