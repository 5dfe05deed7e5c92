"""Independent parts of a CPU computation run on worker threads, one torch thread each.

The chunked LSH path works in cache-sized blocks of a few hundred microseconds each. Split
across torch's intra-op threads, every such op pays a fork/join and each core touches half
of every tensor; on worker threads instead, each core runs whole blocks from its own cache
and torch ops release the GIL while they run. Each worker sets ``torch.set_num_threads(1)``,
which is per thread (OpenMP and MKL keep it thread-local), so the caller's setting is
untouched. There are as many workers as the caller's ``torch.get_num_threads()``.

Parts must not write to the same memory. Work that draws random numbers must not run here:
the order of draws between threads is not fixed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _single_threaded() -> None:
    torch.set_num_threads(1)


def _workers(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(size, thread_name_prefix="reformer-cpu", initializer=_single_threaded)
            _pool_size = size
        return _pool


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: it starts a pool of its own."""
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def worker_count() -> int:
    """How many parts are worth making: the caller's torch threads (1: run in place; also while
    ``torch.compile`` traces, whose kernels spread over the threads themselves)."""
    return 1 if torch.compiler.is_compiling() else torch.get_num_threads()


def run_parts(parts: Sequence[Callable[[], T]]) -> list[T]:
    """Results of ``parts``, run on the workers (in place when there is only one part or one
    thread, as in a worker itself)."""
    size = worker_count()
    if len(parts) <= 1 or size <= 1:
        return [part() for part in parts]
    pool = _workers(size)
    futures = [pool.submit(part) for part in parts]
    return [f.result() for f in futures]


def split_among_workers(n: int, device: torch.device) -> list[range]:
    """``range(n)`` in one piece per worker for work on CPU (:func:`split_evenly`); whole on
    other devices, whose ops run asynchronously anyway."""
    return split_evenly(n, worker_count() if device.type == "cpu" else 1)


def split_evenly(n: int, parts: int) -> list[range]:
    """``range(n)`` in at most ``parts`` contiguous, non-empty pieces of near-equal length."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


@cache
def l2_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """One CPU core's L2 cache size (Linux sysfs ``caches``), or 0 where unknown (the block sizes of
    the chunked path and the hashing follow it)."""
    for index in sorted(caches.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()  # e.g. "2048K"
                return int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]]
        except (OSError, ValueError, KeyError, IndexError):
            return 0
    return 0
