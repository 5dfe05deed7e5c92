"""reformer.allocator: with keep_freed_memory, tensors over glibc's largest mmap threshold reuse
freed memory (no fresh page faults once the heap has grown to hold them); without it, each one
faults its pages in again. Each case runs in its own process, as the setting is process-wide."""

import json
import os
import subprocess
import sys

import pytest

import reformer.cli
from reformer.cli import main

PROBE = """
import json, resource, sys, torch
from reformer.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults, addresses = [], []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(2**24)  # 64 MiB: over glibc's largest mmap threshold (32 MiB)
    addresses.append(hex(tensor.data_ptr()))
    del tensor
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "addresses": addresses}))
"""
PAGES = 2**26 // 4096  # of one 64 MiB tensor
SETTLED = 4  # the last iterations, once the heap has grown to hold the tensor (a few, depending
# on where the small blocks allocated meanwhile land: torch asks for 64-byte alignment, so a hole
# left by a freed tensor is a little too small for the next until holes merge)


def _probe(mode: str, **env: str) -> dict:
    """Page faults of each of 16 allocations of a 64 MiB tensor in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    kept = _probe("keep")
    assert kept["applied"] is True
    assert sum(kept["faults"][-SETTLED:]) < PAGES // 10, kept  # the tensors reuse what the first ones left
    default = _probe("default")
    assert min(default["faults"]) > PAGES // 2, default  # glibc's default: fresh pages every time


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_environment_switch_keeps_glibcs_defaults():
    switched_off = _probe("keep", REFORMER_KEEP_FREED_MEMORY="0")
    assert switched_off["applied"] is False
    assert min(switched_off["faults"]) > PAGES // 2, switched_off


def test_the_train_command_keeps_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(reformer.cli, "keep_freed_memory", lambda: calls.append(True))
    main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")])  # fails after it
    assert calls == [True]
