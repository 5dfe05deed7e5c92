"""``reformer_pytorch.generative_tools``'s names, for code written against that package."""

from .wrappers import TrainingWrapper, top_k, top_p

__all__ = ["TrainingWrapper", "top_k", "top_p"]
