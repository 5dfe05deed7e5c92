"""Model presets: functions returning a :class:`ReformerConfig` for a byte-level causal LM."""

from __future__ import annotations

from collections.abc import Callable

from .config import ReformerConfig


def tiny(max_seq_len: int = 2048) -> ReformerConfig:
    """~0.5M parameters: trains on 2 CPU cores in minutes. A local layer gives every byte its
    neighbours (LSH alone sees only same-bucket bytes), as in the trax/HF enwik8 models."""
    return ReformerConfig(num_tokens=256, dim=128, depth=2, heads=4, bucket_size=64, n_hashes=2,
                          max_seq_len=max_seq_len, causal=True, ff_chunks=4, attn_layers=("local", "lsh"))  # fmt: skip


def small(max_seq_len: int = 4096) -> ReformerConfig:
    """~5M parameters."""
    return ReformerConfig(num_tokens=256, dim=256, depth=6, heads=4, bucket_size=64, n_hashes=4,
                          max_seq_len=max_seq_len, causal=True, ff_chunks=8, attn_layers=("local", "lsh"))  # fmt: skip


def base(max_seq_len: int = 8192) -> ReformerConfig:
    """~20M parameters: the size of the attention benchmarks."""
    return ReformerConfig(num_tokens=256, dim=512, depth=6, heads=8, bucket_size=64, n_hashes=4,
                          max_seq_len=max_seq_len, causal=True, ff_chunks=16, attn_layers=("local", "lsh"))  # fmt: skip


def enwik8(max_seq_len: int = 65536) -> ReformerConfig:
    """The paper's enwik8 model: 12 layers of width 1024, local and LSH layers alternating."""
    return ReformerConfig(num_tokens=256, dim=1024, depth=12, heads=8, bucket_size=64, n_hashes=4,
                          max_seq_len=max_seq_len, causal=True, ff_chunks=64, lsh_dropout=0.1, ff_dropout=0.1,
                          attn_layers=("local", "lsh"))  # fmt: skip


PRESETS: dict[str, Callable[..., ReformerConfig]] = {"tiny": tiny, "small": small, "base": base, "enwik8": enwik8}
