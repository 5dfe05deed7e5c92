"""Builds the package's C and C++ sources with the system's compiler on first use, and loads them.

Each library goes into ``~/.cache/reformer/kernels`` (``$REFORMER_CACHE`` overrides
``~/.cache/reformer``) under a name keyed by its source, the compiler's version, the arguments
and the CPU (for ``-march=native``), so a changed source, compiler or machine builds afresh.

The C source is the one declaration of each function: :func:`load` gives every exported
function (``reformer_*``, defined at the start of a line) the ctypes argument and result types
that :func:`prototypes` reads from its definition.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from ..atomic import atomic_write

logger = logging.getLogger(__name__)

#: An exported function's definition: result type, name, parameter list (over several lines).
_DEFINITION = re.compile(r"^(\w+)\s+(reformer_\w+)\s*\(([^)]*)\)\s*\{", re.MULTILINE)
#: The ctypes of the value types the sources use (every pointer is a ``c_void_p``).
_VALUE_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "size_t": ctypes.c_size_t, "float": ctypes.c_float}

Prototype = tuple[list[type], type | None]  # (argtypes, restype)


def prototypes(source: str) -> dict[str, Prototype]:
    """The ctypes ``(argtypes, restype)`` of each exported function defined in the C text ``source``.
    Raises ``ValueError`` naming the function where a type has no ctypes equivalent here."""
    found = {}
    for result, name, params in _DEFINITION.findall(source):
        try:
            argtypes = [_ctype(param) for param in params.split(",")]
            restype = None if result == "void" else _VALUE_TYPES[result]
        except KeyError as err:
            raise ValueError(f"{name}: no ctypes type for C type {err.args[0]!r} (add it to _VALUE_TYPES)") from None
        found[name] = argtypes, restype
    return found


def _ctype(param: str) -> type:
    """The ctypes type of one C parameter, e.g. ``const float *x`` or ``int64_t rows``."""
    if "*" in param:
        return ctypes.c_void_p
    words = [w for w in param.split() if w != "const"]  # [type, name]
    return _VALUE_TYPES[words[0]]


def load(source: Path, compiler: str, args: list[str], fallback: str) -> ctypes.CDLL | None:
    """``source`` built by ``compiler`` with ``args`` (see :func:`built_library`) and loaded, its
    functions typed by :func:`prototypes`; None where there is no such compiler or the build or the
    load fails, logged with what serves instead (``fallback``)."""
    try:
        lib = ctypes.CDLL(str(built_library(source, compiler, args)))
    except FileNotFoundError:
        logger.info("no compiler %r to build %s: %s", compiler, source.name, fallback)
        return None
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        logger.warning("could not build %s (%s): %s", source.name, detail, fallback)
        return None
    for name, (argtypes, restype) in prototypes(source.read_text()).items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


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
    are added), from the cache or built now. Raises ``FileNotFoundError`` where ``compiler`` is
    missing and ``subprocess.CalledProcessError`` (its ``stderr`` the compiler's) where the build fails."""
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
