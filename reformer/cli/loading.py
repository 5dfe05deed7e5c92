"""What the commands share: finding a checkpoint, its vocabulary, a model to run, the training
data. Imports torch: the commands import it inside ``run``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .. import hub
from ..checkpoint import read_config, read_vocab_file
from ..config import ReformerConfig
from ..data import ByteVocab, Corpus, DuplicationTask, Vocab, load_corpus, vocab_from_dict
from ..labelled import LabelledCorpus, load_labelled
from ..model import ReformerLM, TokenModel
from ..train import MODEL_CLASSES, checkpoint_dirs
from .options import UsageError


def objective_of(architecture: str) -> str:
    """The objective that trains a checkpoint's architecture (``causal`` for a ReformerLM)."""
    found = [name for name, cls in MODEL_CLASSES.items() if cls.__name__ == architecture]
    if not found:
        raise UsageError(f"a {architecture} checkpoint is not one `reformer train` makes "
                         f"({', '.join(c.__name__ for c in MODEL_CLASSES.values())})")  # fmt: skip
    return found[0]


def model_tokens(vocab: Vocab, objective: str) -> int:
    """Token ids a model of ``objective`` needs for ``vocab``: one more for ``mlm``'s mask."""
    return vocab.num_tokens + (objective == "mlm")


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


def resolve_checkpoint(path: str, revision: str | None = None) -> Path:
    """A checkpoint directory, a run directory (its latest checkpoint), or a Hugging Face Hub
    repo id (``org/name``, at ``revision``)."""
    p = hub.resolve(path, revision=revision)
    if (p / "config.json").is_file():
        return p
    found = checkpoint_dirs(p)
    if found:
        return found[-1]
    raise FileNotFoundError(f"no checkpoint at {path} (expected a run directory or a checkpoint directory)")


def read_vocab(ckpt: Path) -> Vocab:
    """A checkpoint's vocabulary (``vocab.json``; bytes when there is none)."""
    saved = read_vocab_file(ckpt)
    if saved is None:
        return ByteVocab()
    try:
        return vocab_from_dict(saved)
    except ValueError as exc:
        raise ValueError(f"corrupt {ckpt / 'vocab.json'}: {exc}") from None


def read_labels(ckpt: Path, config: ReformerConfig) -> tuple[str, ...]:
    """A classifier's label names in id order (``vocab.json``'s ``labels``)."""
    labels = (read_vocab_file(ckpt) or {}).get("labels")
    if not isinstance(labels, list) or len(labels) != config.num_labels or not all(isinstance(x, str) for x in labels):
        raise UsageError(f"{ckpt}: vocab.json does not name the model's {config.num_labels} labels")
    return tuple(labels)


def check_vocab(ckpt: Path, vocab: Vocab, config: ReformerConfig, objective: str) -> None:
    if model_tokens(vocab, objective) != config.num_tokens:
        raise UsageError(f"{ckpt}: the model has {config.num_tokens} tokens but its vocabulary {vocab.num_tokens}")


def load_for_inference(
    path: str, device: str, revision: str | None = None, kind: type[TokenModel] = ReformerLM
) -> tuple[TokenModel, Vocab, Path]:
    """The checkpoint at ``path`` as a ``kind`` (or a subclass: ``TokenModel`` loads any task's
    model), its vocabulary and directory."""
    ckpt = resolve_checkpoint(path, revision)
    check_backend_runs(read_config(ckpt)[1], device)
    model = kind.from_pretrained(ckpt).to(device).eval()
    vocab = read_vocab(ckpt)
    check_vocab(ckpt, vocab, model.config, objective_of(type(model).__name__))
    return model, vocab, ckpt


def load_training_data(
    spec: str, vocab: str | Vocab, seq_len: int, batch_size: int, seed: int, labels: tuple[str, ...] | None = None
) -> Corpus | LabelledCorpus:
    """A corpus (``builtin``, ``pysrc``, a file, ``enwik8:PATH``) or the synthetic ``duplication``
    task (sequences ``0w0w`` of ``seq_len`` bytes; only the second ``w`` is scored); with
    ``labels`` (a classifier's, or ``()`` for a new one) labelled documents
    (:func:`reformer.labelled.load_labelled`). ``vocab``: a kind, or a checkpoint's vocabulary,
    which then encodes the data."""
    if labels is not None:
        return load_labelled(spec, vocab, seq_len, labels or None)
    if spec != "duplication":
        return load_corpus(spec, vocab=vocab)
    if (vocab if isinstance(vocab, str) else vocab.kind) != "byte":
        raise UsageError("the duplication task uses byte tokens: drop --vocab")
    task = DuplicationTask(seq_len, batch_size, n_symbols=255, seed=seed)
    return Corpus("duplication", task, task, ByteVocab())


def checkpoint_identity(spec: str | None) -> str | None:
    """``--init-from`` as stored in ``run.json``: a local path made absolute, a Hub repo id as given."""
    if spec is None or hub.is_repo_id(spec):
        return spec
    return str(Path(spec).resolve())


def data_identity(spec: str) -> str:
    """``--data`` as stored in ``run.json``: file paths made absolute."""
    if spec in ("builtin", "duplication", "listops") or spec.startswith("listops:"):
        return spec
    prefix = "enwik8:" if spec.startswith("enwik8:") else ""
    return prefix + str(Path(spec[len(prefix) :]).resolve())
