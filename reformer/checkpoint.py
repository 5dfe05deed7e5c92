"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors``, written
atomically (temporary file + fsync + rename), with a ``manifest.json`` of the weights' SHA-256
so that a truncated or altered file is reported as such, read back with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .atomic import atomic_write
from .config import ReformerConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

M = TypeVar("M", bound="PretrainedMixin")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of the binary files in ``directory`` (weights, trainer
    state) in ``manifest.json``. JSON files are left out: they are checked when parsed, and a
    hand-edited config should load."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix != ".json")
    entries = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    text = json.dumps({"files": entries}, indent=2) + "\n"
    atomic_write(directory / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text))


def verify_manifest(directory: Path) -> None:
    """Raise a ValueError naming the file if one listed in ``manifest.json`` is missing,
    truncated or altered. Directories without a manifest (older checkpoints) pass."""
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
            raise ValueError(f"corrupt checkpoint {directory}: {name} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise ValueError(
                f"corrupt checkpoint {directory}: {name} has {file.stat().st_size} bytes, "
                f"{entry['bytes']} were written (truncated?)"
            )
        if _sha256(file) != entry["sha256"]:
            raise ValueError(f"corrupt checkpoint {directory}: {name} does not match its checksum (altered on disk)")


class PretrainedMixin:
    """Adds checkpoint I/O to a module with a ``config`` attribute and a ``config=`` constructor."""

    config: ReformerConfig

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"architecture": type(self).__name__, "format_version": FORMAT_VERSION, **self.config.to_dict()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_model(self, tmp))
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
        write_manifest(directory)
        return directory

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike) -> M:
        directory = Path(directory)
        weights_path = directory / WEIGHTS_NAME
        arch, config = read_config(directory)
        if not weights_path.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        verify_manifest(directory)
        if arch != cls.__name__:
            raise ValueError(f"{directory} holds a {arch}, not a {cls.__name__}")
        model = cls(config=config)
        assert isinstance(model, nn.Module)
        try:
            load_model(model, weights_path, strict=True)
        except SafetensorError as exc:
            raise ValueError(f"corrupt weights file {weights_path}: {exc}") from None
        except RuntimeError as exc:  # missing/unexpected keys or shape mismatch
            raise ValueError(f"{weights_path} does not match the config in {directory / CONFIG_NAME}: {exc}") from None
        return model


def read_config(directory: str | os.PathLike) -> tuple[str, ReformerConfig]:
    """``(architecture, config)`` of a checkpoint directory."""
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
    try:
        return arch, ReformerConfig.from_dict(meta)
    except TypeError as exc:
        raise ValueError(f"corrupt {path}: {exc}") from None
