"""Who may write a run directory: one training at a time, and only into a directory that is a
run (or new, or empty).

A run directory holds ``run.json`` (the settings it was started with, compared on ``--resume``),
``checkpoints/``, the logs, and ``.lock``: an ``flock`` held while a training writes there. The
kernel drops the lock when its process ends, however it ends, so a killed run never leaves a
lock that blocks the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .atomic import atomic_write

LOCK_NAME = ".lock"
RUN_NAME = "run.json"
RUN_FORMAT_VERSION = 1

_held: dict[Path, int] = {}  # run directories this process holds, with their nesting depth


class RunInUse(ValueError):
    """Another process is training in this run directory."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for writing (re-entrant within a process); raise :class:`RunInUse` if
    another process holds it."""
    key = run_dir.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    check_not_in_use(run_dir)  # names the holder
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # taken since the check
        os.close(fd)
        raise RunInUse(f"{run_dir} is in use by another training; wait for it to end or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the flock


def check_not_in_use(run_dir: Path) -> None:
    """Raise :class:`RunInUse` if a process holds ``run_dir``'s lock (writes nothing)."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
        raise RunInUse(f"{run_dir} is in use by another training (process {owner}); "
                       "wait for it to end or choose another --out") from None  # fmt: skip
    finally:
        os.close(fd)


def is_run(run_dir: Path) -> bool:
    """True if ``run_dir`` was written by a training: it has ``run.json`` or checkpoints (runs of
    earlier versions have no ``run.json``)."""
    from .train import checkpoint_dirs

    return (run_dir / RUN_NAME).is_file() or bool(checkpoint_dirs(run_dir))


def check_out_dir(run_dir: Path) -> None:
    """Refuse an output directory that a training must not write into: a dangling symlink, a
    file, or a directory holding anything but a run."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise ValueError(f"--out {run_dir} is a symlink to {os.readlink(run_dir)}, which does not exist")
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is not a directory")
    if is_run(run_dir):
        return
    others = sorted(p.name for p in run_dir.iterdir())
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ValueError(f"--out {run_dir} is not a run directory and holds other files ({shown}); "
                         "choose a new or empty directory")  # fmt: skip


def read_settings(run_dir: Path) -> dict | None:
    """The settings stored in ``run.json`` (None for a run without one)."""
    path = run_dir / RUN_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        version, settings = meta["format_version"], meta["settings"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupt {path}: {exc}") from None
    if not isinstance(version, int) or version > RUN_FORMAT_VERSION or not isinstance(settings, dict):
        raise ValueError(f"{path}: format_version {version!r} is not one this version reads "
                         f"(<= {RUN_FORMAT_VERSION}); upgrade reformer-torch")  # fmt: skip
    return settings


def write_settings(run_dir: Path, settings: dict) -> None:
    text = json.dumps({"format_version": RUN_FORMAT_VERSION, "settings": settings}, indent=2) + "\n"
    atomic_write(run_dir / RUN_NAME, lambda tmp: Path(tmp).write_text(text))


def setting_differences(stored: dict, given: dict, flags: dict[str, str]) -> list[str]:
    """``--flag VALUE (run: VALUE)`` for each setting of ``given`` that ``stored`` holds with
    another value (settings it does not hold, e.g. of an older run, are not compared)."""
    return [f"{flags[k]} {given[k]} (run: {stored[k]})" for k in given if k in stored and stored[k] != given[k]]
