"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors``, written
atomically (temporary file + fsync + rename), with a ``manifest.json`` of the weights' SHA-256
so that a truncated or altered file is reported as such, read back with clear errors, a
model card ``README.md``, and ``vocab.json`` when the model has a ``vocab`` (``reformer train``'s
token vocabulary and a classifier's label names, so the CLI can use a model from the Hub).
``from_pretrained`` also takes a Hugging Face Hub repo id (:mod:`reformer.hub`)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from . import hub
from .atomic import atomic_write
from .config import ReformerConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
FORMAT_VERSION = 1

M = TypeVar("M", bound="PretrainedMixin")

#: Tensors with one row per token id: a masked LM has one more row than its vocabulary (its mask
#: token), so a model of another task shares the rows both have.
TOKEN_ROWS = ("token_emb.weight", "to_logits.weight", "to_logits.bias")


@dataclass
class WeightTransfer:
    """What :meth:`PretrainedMixin.init_from` did, by tensor name."""

    copied: list[str]
    """Set from the checkpoint (token-indexed ones: the rows both have)."""
    new: list[str]
    """Left as initialised: the checkpoint has no tensor of that name and shape (a new head)."""
    unused: list[str]
    """In the checkpoint, not in the model (e.g. a language model's output layer)."""

    def summary(self) -> str:
        new = f"; new: {', '.join(self.new)}" if self.new else ""
        unused = f"; not used: {', '.join(self.unused)}" if self.unused else ""
        return f"{len(self.copied)} of {len(self.copied) + len(self.new)} tensors from the checkpoint{new}{unused}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of the binary files in ``directory`` (weights, trainer
    state) in ``manifest.json``. JSON and Markdown files are left out: a config is checked when
    parsed, and a hand-edited config or model card should load."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix not in (".json", ".md"))
    entries = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    text = json.dumps({"files": entries}, indent=2) + "\n"
    atomic_write(directory / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text))


def verify_manifest(directory: Path, needed: tuple[str, ...] | None = None) -> None:
    """Raise a ValueError naming the file if one listed in ``manifest.json`` is missing,
    truncated or altered. Directories without a manifest (older checkpoints) pass. ``needed``:
    the listed files that must be present (default all); another listed file may be absent (a
    Hub download fetches the model's files, not a training checkpoint's ``trainer.pt``), and
    is checked when present."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        entries = json.loads(path.read_text())["files"]
        well_formed = isinstance(entries, dict) and all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            and "/" not in name for name, e in entries.items()
        )  # fmt: skip
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupt checkpoint {directory}: unreadable {MANIFEST_NAME} ({exc})") from None
    if not well_formed:
        raise ValueError(f"corrupt checkpoint {directory}: {MANIFEST_NAME} does not list files with bytes and sha256")
    for name, entry in entries.items():
        file = directory / name
        if not file.is_file():
            if needed is not None and name not in needed:
                continue
            raise ValueError(f"corrupt checkpoint {directory}: {name} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise ValueError(
                f"corrupt checkpoint {directory}: {name} has {file.stat().st_size} bytes, "
                f"{entry['bytes']} were written (truncated?)"
            )
        if _sha256(file) != entry["sha256"]:
            raise ValueError(f"corrupt checkpoint {directory}: {name} does not match its checksum (altered on disk)")


class PretrainedMixin:
    """Adds checkpoint I/O to a module with a ``config`` attribute and a ``config=`` constructor
    (a model made of several, :class:`~reformer.model.ReformerEncDec`, overrides
    ``_saved_config`` / ``_from_saved_config``)."""

    config: ReformerConfig
    vocab: dict[str, Any] | None = None
    """What ``vocab.json`` describes (``{"kind": "byte"}``, a classifier's ``"labels"``...):
    read by ``from_pretrained``, written by ``save_pretrained``."""

    def _saved_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def _from_saved_config(cls: type[M], saved: dict[str, Any]) -> M:
        return cls(config=ReformerConfig.from_dict(saved))

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        training: dict[str, Any] | None = None,
        vocab: dict[str, Any] | None = None,
    ) -> Path:
        """Write the checkpoint into ``directory`` (created if needed): weights, config, manifest,
        ``vocab.json`` (``vocab``, by default the model's own, if any) and a model card
        ``README.md`` (``training``: what to say of the training, e.g. data, steps, validation
        loss) unless the directory holds a README.md this library did not write."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"architecture": type(self).__name__, "format_version": FORMAT_VERSION, **self._saved_config()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_model(self, tmp))
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
        vocab = self.vocab if vocab is None else vocab
        if vocab is not None:
            atomic_write(directory / VOCAB_NAME, lambda tmp: Path(tmp).write_text(json.dumps(vocab) + "\n"))
        card = directory / hub.CARD_NAME
        if card.exists() and not hub.is_our_card(card):
            warnings.warn(f"{card} exists and was not written by reformer-torch: left as it is", stacklevel=2)
        else:
            text = hub.model_card(self, training)
            atomic_write(card, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        write_manifest(directory)
        return directory

    @classmethod
    def from_pretrained(
        cls: type[M], name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
    ) -> M:
        """Load a checkpoint directory, or a Hugging Face Hub repo id (``"org/name"``, at
        ``revision``; downloaded into the Hub cache, ``HF_HUB_OFFLINE=1`` honoured)."""
        directory = hub.resolve(name_or_path, revision=revision, token=token)
        weights_path = directory / WEIGHTS_NAME
        arch, saved = read_meta(directory)
        if not weights_path.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        verify_manifest(directory, needed=(WEIGHTS_NAME,))
        kinds = {kind.__name__: kind for kind in (cls, *_subclasses(cls))}
        if arch not in kinds:  # (a subclass is one: ReformerLM.from_pretrained gives a ReformerForMaskedLM)
            raise ValueError(f"{directory} holds a {arch}, not a {cls.__name__}")
        try:
            model = kinds[arch]._from_saved_config(saved)
        except (TypeError, KeyError) as exc:
            raise ValueError(f"corrupt {directory / CONFIG_NAME}: {exc}") from None
        assert isinstance(model, nn.Module)
        try:
            load_model(model, weights_path, strict=True)
        except SafetensorError as exc:
            raise ValueError(f"corrupt weights file {weights_path}: {exc}") from None
        except RuntimeError as exc:  # missing/unexpected keys or shape mismatch
            raise ValueError(f"{weights_path} does not match the config in {directory / CONFIG_NAME}: {exc}") from None
        model.vocab = read_vocab_file(directory)
        return model

    def init_from(
        self, name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
    ) -> WeightTransfer:
        """Set this model's weights from a checkpoint (a directory or a Hub repo id) of a model
        that may have another task: every tensor both have under one name and shape is copied, and
        of the token-indexed ones (:data:`TOKEN_ROWS`) the rows both have, so that e.g. a classifier
        starts from a masked LM pre-trained on the same vocabulary, its head new."""
        directory = hub.resolve(name_or_path, revision=revision, token=token)
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        verify_manifest(directory, needed=(WEIGHTS_NAME,))
        try:
            saved = load_file(weights_path)
        except SafetensorError as exc:
            raise ValueError(f"corrupt weights file {weights_path}: {exc}") from None
        assert isinstance(self, nn.Module)
        own = self.state_dict()  # (tensors sharing the parameters' and buffers' storage)
        copied, new = [], []
        with torch.no_grad():
            for name, tensor in own.items():
                source = saved.get(name)
                if source is not None and source.shape == tensor.shape:
                    tensor.copy_(source)
                elif source is not None and name in TOKEN_ROWS and source.shape[1:] == tensor.shape[1:]:
                    rows = min(len(source), len(tensor))
                    tensor[:rows].copy_(source[:rows])
                else:
                    new.append(name)
                    continue
                copied.append(name)
        return WeightTransfer(copied, new, [name for name in saved if name not in own])

    def push_to_hub(self, repo_id: str, **options: Any) -> Any:
        """Upload this model to the Hugging Face Hub as one commit (see :func:`reformer.hub.push_to_hub`
        for ``revision``, ``private``, ``token``, ``commit_message``, ``training``)."""
        return hub.push_to_hub(self, repo_id, **options)


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def read_meta(directory: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(architecture, saved configuration)`` of a checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory} (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt {path}: not a JSON object")
    if "model_type" in meta:
        raise ValueError(f"{directory} holds a Hugging Face transformers checkpoint; convert it first: "
                         f"reformer convert --from-transformers {directory} --out DIR")  # fmt: skip
    arch, version = meta.pop("architecture", "ReformerLM"), meta.pop("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is newer than this version of reformer-torch "
                         f"reads ({FORMAT_VERSION}); upgrade it")  # fmt: skip
    return arch, meta


def read_vocab_file(directory: Path) -> dict[str, Any] | None:
    """``vocab.json`` of a checkpoint directory as a JSON object, or None if it has none."""
    path = directory / VOCAB_NAME
    if not path.is_file():
        return None
    try:
        vocab = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt {path}: {exc}") from None
    if not isinstance(vocab, dict):
        raise ValueError(f"corrupt {path}: not a JSON object")
    return vocab


def read_config(directory: str | os.PathLike) -> tuple[str, ReformerConfig]:
    """``(architecture, config)`` of a single-config checkpoint directory."""
    arch, meta = read_meta(directory)
    try:
        return arch, ReformerConfig.from_dict(meta)
    except TypeError as exc:
        raise ValueError(f"corrupt {Path(directory) / CONFIG_NAME}: {exc}") from None
