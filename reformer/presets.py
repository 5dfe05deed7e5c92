"""Model presets: functions returning a :class:`ReformerConfig` for a byte-level causal LM.

Importing this module does not import torch (``reformer train --help`` lists the presets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ReformerConfig


def _byte_lm(**fields) -> ReformerConfig:
    """A causal byte-level LM whose local layers give every byte its neighbours (LSH alone sees
    only same-bucket bytes), as in the trax/HF enwik8 models."""
    from .config import ReformerConfig  # here, not at the top: see the module's docstring

    return ReformerConfig(num_tokens=256, bucket_size=64, causal=True, attn_layers=("local", "lsh"), **fields)


def tiny(max_seq_len: int = 2048) -> ReformerConfig:
    """~0.5M parameters: trains on 2 CPU cores in minutes."""
    return _byte_lm(dim=128, depth=2, heads=4, n_hashes=2, max_seq_len=max_seq_len, ff_chunks=4)


def small(max_seq_len: int = 4096) -> ReformerConfig:
    """~5M parameters."""
    return _byte_lm(dim=256, depth=6, heads=4, n_hashes=4, max_seq_len=max_seq_len, ff_chunks=8)


def base(max_seq_len: int = 8192) -> ReformerConfig:
    """~20M parameters: the size of the attention benchmarks."""
    return _byte_lm(dim=512, depth=6, heads=8, n_hashes=4, max_seq_len=max_seq_len, ff_chunks=16)


def enwik8(max_seq_len: int = 65536) -> ReformerConfig:
    """The paper's enwik8 model: 12 layers of width 1024, local and LSH layers alternating."""
    return _byte_lm(dim=1024, depth=12, heads=8, n_hashes=4, max_seq_len=max_seq_len, ff_chunks=64,
                    lsh_dropout=0.1, ff_dropout=0.1)  # fmt: skip


PRESETS: dict[str, Callable[..., ReformerConfig]] = {"tiny": tiny, "small": small, "base": base, "enwik8": enwik8}
