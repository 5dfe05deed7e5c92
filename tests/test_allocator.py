"""reformer.allocator: with keep_freed_memory, large tensors reuse freed memory (no fresh page
faults once it is there), from the caching pool of cpu_allocator.cpp or, where that cannot be
built, from glibc's heap; without it, each one faults its pages in again. Each case runs in its
own process, as the setting is process-wide."""

import json
import os
import subprocess
import sys

import pytest

import reformer.allocator
from reformer.cli import main

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, Linux's mmap")

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


def _run(code: str, *args: str, **env: str) -> dict:
    """The JSON that ``code`` prints, run in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@linux_only
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    kept = _run(PROBE, "keep")
    assert kept["applied"] == "pool"
    assert sum(kept["faults"][1:]) < PAGES // 10, kept  # only the first tensor faults its pages in
    assert len(set(kept["addresses"])) == 1, kept  # the pool hands the same block back
    default = _run(PROBE, "default")
    assert min(default["faults"]) > PAGES // 2, default  # glibc's default: fresh pages every time


@linux_only
def test_without_a_cxx_compiler_glibcs_heap_keeps_freed_memory(tmp_path):
    heap = _run(PROBE, "keep", CXX=str(tmp_path / "no-such-compiler"), REFORMER_CACHE=str(tmp_path))
    assert heap["applied"] == "heap"
    assert sum(heap["faults"][-SETTLED:]) < PAGES // 10, heap


@linux_only
def test_the_environment_switch_keeps_the_defaults():
    switched_off = _run(PROBE, "keep", REFORMER_KEEP_FREED_MEMORY="0")
    assert switched_off["applied"] is None
    assert min(switched_off["faults"]) > PAGES // 2, switched_off


UNDER_A_LIMIT = """
import json, resource, torch
from reformer.allocator import keep_freed_memory, pool_bytes
resource.setrlimit(resource.RLIMIT_DATA, (6 * 2**30, 6 * 2**30))  # less than the machine's memory
applied = keep_freed_memory()
tensor = torch.ones(2**26)  # 256 MiB
print(json.dumps({"applied": applied, "in_use": pool_bytes()[0], "sum": float(tensor.sum())}))
"""


@linux_only
def test_a_limit_on_the_data_segment_gets_a_smaller_pool():
    result = _run(UNDER_A_LIMIT)
    assert result["applied"] == "pool" and result["in_use"] == 2**28 and result["sum"] == 2**26, result


POOL_STRESS = """
import json, os, random, threading, torch
from reformer.allocator import keep_freed_memory, pool_bytes
before = torch.full((2**20,), 7.0)  # from torch's own allocator: still freed by its deleter later
assert keep_freed_memory() == "pool" and keep_freed_memory() == "pool"  # (a second call is a no-op)
MiB = 2**18  # floats
def churn(seed, errors):
    rng = random.Random(seed)
    live = []
    for step in range(400):
        if live and rng.random() < 0.45:
            value, tensor = live.pop(rng.randrange(len(live)))
            if not bool((tensor == value).all()):
                errors.append(value)
        else:
            big = rng.random() < 0.5
            n = rng.choice([1, 3, 16, 48, 64]) * MiB + rng.randrange(0, 4096) if big else rng.randrange(1, 9000)
            live.append((float(seed * 1000 + step), torch.full((n,), float(seed * 1000 + step))))
    for value, tensor in live:
        if not bool((tensor == value).all()):
            errors.append(value)
errors = []
threads = [threading.Thread(target=churn, args=(seed, errors)) for seed in range(3)]
[t.start() for t in threads]; [t.join() for t in threads]
in_use, touched = pool_bytes()
stop = threading.Event()
busy = threading.Thread(target=lambda: [torch.empty(4 * MiB) for _ in iter(stop.is_set, True)])
busy.start()
pid = os.fork()  # while another thread allocates: the child must not inherit the pool's lock held
if pid == 0:  # (small ops only: torch's OpenMP pool does not survive a fork)
    t = torch.empty(4 * MiB)
    t[:100].fill_(1.0)
    os._exit(0 if bool((t[:100] + before[:100] == 8).all()) else 1)
_, status = os.waitpid(pid, 0)
stop.set(); busy.join()
try:
    torch.empty(2**50)  # 4 PiB: neither the pool nor malloc holds it
    oom = None
except torch.OutOfMemoryError as err:
    oom = str(err)
print(json.dumps({"errors": errors, "in_use": in_use, "touched": touched, "child": status,
                  "before": bool((before == 7).all()), "oom": oom}))
"""


@linux_only
def test_pooled_tensors_never_overlap_and_are_all_returned():
    # three threads allocate and free tensors from 4 KiB to 64 MiB, each filled with its own value
    result = _run(POOL_STRESS)
    assert result["errors"] == [], "a tensor's memory was handed out twice"
    assert result["in_use"] == 0 and result["touched"] > 0, result
    assert result["child"] == 0 and result["before"], result
    assert "you tried to allocate 4503599627370496 bytes" in result["oom"], result  # as torch's own allocator says


FRAGMENTATION = """
import json, torch
from reformer.allocator import keep_freed_memory, pool_bytes
assert keep_freed_memory() == "pool"
MiB = 2**18  # floats
peak = 0
for _ in range(6):  # a layer's pattern: activations kept, larger temporaries, small tensors in between
    kept, small = [], []
    for _ in range(8):
        kept.append(torch.empty(16 * MiB))
        small.append(torch.empty(100))
        hidden = torch.empty(64 * MiB)
        small.append(torch.empty(3000))
        del hidden
    peak = max(peak, pool_bytes()[0])
    del kept, small
print(json.dumps({"touched": pool_bytes()[1], "peak": peak}))
"""


@linux_only
def test_the_pool_stays_at_the_peak_of_live_tensors_when_small_ones_come_in_between():
    # (glibc's heap grows to 2.7 times that here, 528 MiB: the small blocks split the holes the
    # temporaries leave)
    result = _run(FRAGMENTATION)
    assert result["touched"] <= 1.1 * (result["peak"] + 64 * 2**20), result


def test_the_train_command_keeps_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(reformer.allocator, "keep_freed_memory", lambda: calls.append(True))
    main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")])  # fails after it
    assert calls == [True]
