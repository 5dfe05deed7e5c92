"""``reformer_pytorch.autopadder``'s names, for code written against that package."""

from .wrappers import Autopadder

__all__ = ["Autopadder"]
