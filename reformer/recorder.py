"""``reformer_pytorch.recorder``'s names, for code written against that package."""

from .wrappers import Recorder

__all__ = ["Recorder"]
