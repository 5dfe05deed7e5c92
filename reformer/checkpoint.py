"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors``, written
atomically (temporary file + rename), read back with clear errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .config import ReformerConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

M = TypeVar("M", bound="PretrainedMixin")


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PretrainedMixin:
    """Adds checkpoint I/O to a module with a ``config`` attribute and a ``config=`` constructor."""

    config: ReformerConfig

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"architecture": type(self).__name__, "format_version": FORMAT_VERSION, **self.config.to_dict()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_model(self, tmp))
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
        return directory

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike) -> M:
        directory = Path(directory)
        weights_path = directory / WEIGHTS_NAME
        arch, config = read_config(directory)
        if not weights_path.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
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
        arch = meta.pop("architecture", "ReformerLM")
        meta.pop("format_version", None)
        return arch, ReformerConfig.from_dict(meta)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise ValueError(f"corrupt {path}: {exc}") from None
