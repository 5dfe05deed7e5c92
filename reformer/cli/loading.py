"""What the commands share: finding a checkpoint, its vocabulary, a model to run, the training
data. Imports torch: the commands import it inside ``run``."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..checkpoint import read_config
from ..config import ReformerConfig
from ..data import ByteVocab, CharVocab, Corpus, DuplicationTask, load_corpus, vocab_from_dict
from ..model import ReformerLM
from ..train import checkpoint_dirs
from .options import UsageError


def check_backend_runs(config: ReformerConfig, device: str) -> None:
    """Refuse a config whose ``attn_backend`` cannot run here, before any work."""
    if config.attn_backend != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise UsageError("the model's attn_backend 'triton' needs the triton package (pip install 'reformer-torch"
                         "[gpu]'); set attn_backend to 'auto' in its config.json to run without")  # fmt: skip
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"the model's attn_backend 'triton' needs --device cuda (got {device}); set attn_backend "
                         "to 'auto' in its config.json to run here")  # fmt: skip


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    found = checkpoint_dirs(p)
    if found:
        return found[-1]
    raise FileNotFoundError(f"no checkpoint at {path} (expected a run directory or a checkpoint directory)")


def read_vocab(ckpt: Path) -> ByteVocab | CharVocab:
    """A checkpoint's vocabulary (``vocab.json``; bytes when there is none)."""
    path = ckpt / "vocab.json"
    if not path.is_file():
        return ByteVocab()
    try:
        return vocab_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"corrupt {path}: {exc}") from None


def check_vocab(ckpt: Path, vocab: ByteVocab | CharVocab, config: ReformerConfig) -> None:
    if vocab.num_tokens != config.num_tokens:
        raise UsageError(f"{ckpt}: the model has {config.num_tokens} tokens but its vocabulary {vocab.num_tokens}")


def load_for_inference(path: str, device: str) -> tuple[ReformerLM, ByteVocab | CharVocab, Path]:
    ckpt = resolve_checkpoint(path)
    check_backend_runs(read_config(ckpt)[1], device)
    model = ReformerLM.from_pretrained(ckpt).to(device).eval()
    vocab = read_vocab(ckpt)
    check_vocab(ckpt, vocab, model.config)
    return model, vocab, ckpt


def load_training_data(
    spec: str, vocab: str | ByteVocab | CharVocab, seq_len: int, batch_size: int, seed: int
) -> Corpus:
    """A corpus (``builtin``, ``pysrc``, a file, ``enwik8:PATH``) or the synthetic ``duplication``
    task (sequences ``0w0w`` of ``seq_len`` bytes; only the second ``w`` is scored). ``vocab``: a
    kind, or a checkpoint's vocabulary, which then encodes the data."""
    if spec != "duplication":
        return load_corpus(spec, vocab=vocab)
    if (vocab if isinstance(vocab, str) else vocab.kind) != "byte":
        raise UsageError("the duplication task uses byte tokens: drop --vocab")
    task = DuplicationTask(seq_len, batch_size, n_symbols=255, seed=seed)
    return Corpus("duplication", task, task, ByteVocab())


def data_identity(spec: str) -> str:
    """``--data`` as stored in ``run.json``: file paths made absolute."""
    if spec in ("builtin", "duplication"):
        return spec
    prefix = "enwik8:" if spec.startswith("enwik8:") else ""
    return prefix + str(Path(spec[len(prefix) :]).resolve())
