"""reformer.allocator: with keep_freed_memory, tensors over glibc's largest mmap threshold reuse
freed memory (no fresh page faults after the first); without it, each one faults its pages in
again. Each case runs in its own process, as the setting is process-wide."""

import os
import subprocess
import sys

import pytest

import reformer.cli
from reformer.cli import main

PROBE = """
import resource, sys, torch
from reformer.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # (the heap grows to its size in the first two)
    torch.ones(2**24)  # 64 MiB: over glibc's largest mmap threshold (32 MiB)
before = faults()
for _ in range(5):
    torch.ones(2**24)
print(applied, faults() - before)
"""
PAGES = 2**26 // 4096  # of one 64 MiB tensor


def _probe(mode: str, **env: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    applied, faults = _probe("keep")
    assert applied == "True"
    assert faults < PAGES // 10  # five 64 MiB tensors from the memory the first ones left
    _, default_faults = _probe("default")
    assert default_faults > 4 * PAGES  # glibc's default: fresh pages every time


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_environment_switch_keeps_glibcs_defaults():
    applied, faults = _probe("keep", REFORMER_KEEP_FREED_MEMORY="0")
    assert applied == "False"
    assert faults > 4 * PAGES


def test_the_train_command_keeps_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(reformer.cli, "keep_freed_memory", lambda: calls.append(True))
    main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")])  # fails after it
    assert calls == [True]
