"""Writing files and directories atomically: a reader (or a run resumed after a crash) sees the
old version or the new one, never a half-written file. The one home of temporary file + fsync +
rename in the package; it imports nothing of ``reformer``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

#: Name prefix of the temporary directories of :func:`atomic_directory` (a killed process leaves them).
TMP_DIR_PREFIX = ".tmp-"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to disk, so a rename after it cannot
    outlive the data in a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask: from /proc on Linux, else read by setting it (there is no getter;
    a file another thread creates meanwhile would get 0o022)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_file(path: str | os.PathLike, write) -> None:
    """Call ``write(path)``; a failure (Python's ``OSError``, torch's ``RuntimeError`` "file write
    failed", safetensors' ``SafetensorError`` on a full disk) becomes an ``OSError`` naming the
    file and the space left."""
    try:
        write(path)
    except (OSError, RuntimeError, SafetensorError) as exc:
        fs = os.statvfs(Path(path).parent)
        detail = str(exc).strip().splitlines()[-1][:200]
        raise OSError(f"could not write {path} ({fs.f_bavail * fs.f_frsize:,} bytes free there): {detail}") from None


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a partial file, and
    it gets the permissions of any new file (the umask's, not ``mkstemp``'s 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_file(tmp, write)
        os.chmod(tmp, 0o666 & ~current_umask())
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A fresh directory next to ``path`` to fill; when the block succeeds its files are flushed
    and it replaces ``path`` in one rename, else it is removed. ``path`` may be an older
    directory of ours, never a symlink (it could point anywhere)."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=TMP_DIR_PREFIX))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # as any new directory (mkdtemp's is 0700)
        yield tmp
        for file in tmp.iterdir():
            fsync_path(file)
        if path.is_symlink():
            raise ValueError(f"{path} is a symlink, not a directory written here; move it away")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
