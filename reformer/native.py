"""Builds the package's C and C++ sources with the system's compiler on first use.

Each library goes into ``~/.cache/reformer/kernels`` (``$REFORMER_CACHE`` overrides
``~/.cache/reformer``) under a name keyed by its source, the compiler's version, the arguments
and the CPU (for ``-march=native``), so a changed source, compiler or machine builds afresh.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from .atomic import atomic_write


def _cache_dir() -> Path:
    root = os.environ.get("REFORMER_CACHE") or Path.home() / ".cache" / "reformer"
    return Path(root) / "kernels"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the architecture and, on Linux, the CPU's flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def built_library(source: Path, compiler: str, args: list[str]) -> Path:
    """The shared library of ``source`` built by ``compiler`` with ``args`` (``source`` and ``-o``
    are added), from the cache or built now. Raises ``OSError`` where ``compiler`` is missing and
    ``subprocess.CalledProcessError`` (its ``stderr`` the compiler's) where the build fails."""
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no compiler {compiler!r}")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), version.encode(), " ".join(args).encode(),
                                     _cpu_identity().encode()]))  # fmt: skip
    path = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not path.exists():
        _compile(compiler, source, args, path)
    return path


def _compile(compiler: str, source: Path, args: list[str], path: Path) -> None:
    """Builds into a temporary file next to ``path`` and renames it: a concurrent or interrupted
    build never leaves a partial library under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: str) -> None:
        subprocess.run([compiler, str(source), "-o", tmp, *args], capture_output=True, text=True, check=True)

    atomic_write(path, build)
