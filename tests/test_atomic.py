"""reformer.atomic: a file or directory is replaced whole or not at all, and nothing temporary stays."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reformer.atomic import TMP_DIR_PREFIX, atomic_directory, atomic_write, current_umask


class Interrupted(Exception):
    pass


def _interrupted_write(tmp):
    with open(tmp, "w") as f:
        f.write("half")
    raise Interrupted


def test_atomic_write_replaces_the_file_whole_with_the_umasks_mode(tmp_path):
    path = tmp_path / "table.md"
    path.write_text("old")
    atomic_write(path, lambda tmp: Path(tmp).write_text("new"))
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["table.md"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.md"
    path.write_text("old")
    with pytest.raises(Interrupted):
        atomic_write(path, _interrupted_write)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["table.md"]


def test_a_full_disk_names_the_file(tmp_path):
    def disk_full(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"could not write .*table\.md.* bytes free there.*No space left"):
        atomic_write(tmp_path / "table.md", disk_full)
    assert os.listdir(tmp_path) == []


def test_atomic_directory_replaces_the_old_one(tmp_path):
    final = tmp_path / "step-1"
    final.mkdir()
    (final / "stale.bin").write_bytes(b"x")
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TMP_DIR_PREFIX) and not final.samefile(tmp)
        (tmp / "weights.bin").write_bytes(b"new")
    assert sorted(os.listdir(final)) == ["weights.bin"] and os.listdir(tmp_path) == ["step-1"]
    assert final.stat().st_mode & 0o777 == 0o777 & ~current_umask()


def test_a_failed_atomic_directory_keeps_the_old_one_and_no_temporary(tmp_path):
    final = tmp_path / "step-1"
    final.mkdir()
    (final / "weights.bin").write_bytes(b"old")
    with pytest.raises(Interrupted), atomic_directory(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise Interrupted
    assert (final / "weights.bin").read_bytes() == b"old" and os.listdir(tmp_path) == ["step-1"]


def test_atomic_directory_never_replaces_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("theirs")
    link = tmp_path / "step-1"
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="is a symlink"), atomic_directory(link) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert link.is_symlink() and (elsewhere / "keep.txt").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "step-1"]
