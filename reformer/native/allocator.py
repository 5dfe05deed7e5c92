"""Keep freed memory in the process for the next step, for CPU training.

glibc's malloc serves every block over its mmap threshold (which adapts, up to 32 MiB) with
fresh pages from the kernel and hands them back when the block is freed. So each such tensor
pays a page fault per 4 KiB page, every time it is allocated: a depth-6 ``ReformerLM`` step at
16K tokens maps about 14 GB of fresh pages (3.7 million faults, 17% of the step's time on a
2-core machine). :func:`keep_freed_memory` makes torch take its CPU tensors from a pool that
keeps freed memory, as a GPU caching allocator does: ``allocator.cpp``, built on first use
with the system's C++ compiler against torch's headers (by :mod:`reformer.native.build`, as the
CPU kernels are). Tensors of 1 MiB and more come from one reserved range of address space, best
fit, with freed neighbours merged and transparent huge pages advised; smaller ones from malloc,
whose heap is kept too (so even a process started with a low ``MALLOC_MMAP_THRESHOLD_`` maps no
fresh pages for them). The pages are faulted in during the first step, then reused, and the pool's resident
memory stays at the step's peak of live tensors: 1.91 GiB after a 32K-token step whose live
peak is 1.90 GiB.

Telling glibc itself to keep its heap (no mmap, no trimming) is the fallback where the pool
cannot be built. It avoids the faults but not fragmentation: small allocations settle in the
holes freed tensors leave, the next tensor of that size no longer fits, and the heap grows to
about three times the live memory (6.5 GiB after the same 32K step).

``reformer train`` and ``reformer reproduce`` call it; ``REFORMER_KEEP_FREED_MEMORY=0`` keeps
torch's and glibc's defaults. It changes the whole process, so the library never calls it on
its own.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from . import build

SOURCE = Path(__file__).with_name("allocator.cpp")

M_TRIM_THRESHOLD = -1  # free memory at the top of the heap is returned above this many bytes
M_MMAP_THRESHOLD = -3  # blocks of at least this many bytes are mmap'ed (fresh pages)
M_MMAP_MAX = -4  # how many blocks may be mmap'ed at once (0: none, every block from the heap)


def mallopt(option: int, value: int) -> bool:
    """glibc's ``mallopt(option, value)``; False where it refused or the C library is not glibc
    (macOS, Windows, musl)."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return fn(option, value) == 1  # 1 on success


def keep_freed_memory() -> str | None:
    """Make freed CPU memory stay in the process for reuse (see the module doc). Returns how:
    ``"pool"`` (the caching allocator, now or from an earlier call), ``"heap"`` (glibc's malloc
    keeps its heap: the pool could not be built), or None (``REFORMER_KEEP_FREED_MEMORY=0``, or
    neither applies, e.g. on macOS)."""
    if os.environ.get("REFORMER_KEEP_FREED_MEMORY", "1") == "0":
        return None
    lib = _pool_library()
    pooled = lib is not None and bool(lib.reformer_install_cpu_allocator(_physical_memory()))
    kept = keep_heap()  # (with the pool, for the blocks under 1 MiB that still come from malloc)
    return "pool" if pooled else "heap" if kept else None


def keep_heap() -> bool:
    """The fallback of :func:`keep_freed_memory`: glibc's malloc serves every block from its heap
    and never trims it. False where it refused or the C library is not glibc."""
    return mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1)  # -1: never trim (mallopt(3))


def pool_bytes() -> tuple[int, int]:
    """The pool's ``(in use, resident)`` bytes: of its blocks in use now, and of the address space
    it has touched (its high-water mark, kept resident). ``(0, 0)`` before it is installed."""
    lib = _pool_library()
    if lib is None:
        return 0, 0
    in_use, touched = ctypes.c_size_t(), ctypes.c_size_t()
    lib.reformer_cpu_allocator_stats(ctypes.byref(in_use), ctypes.byref(touched))
    return in_use.value, touched.value


def _physical_memory() -> int:
    """The pool's reservation: address space for all of this machine's memory (a larger tensor,
    or one past it, comes from malloc)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@functools.lru_cache(maxsize=1)
def _pool_library() -> ctypes.CDLL | None:
    if not hasattr(os, "sysconf") or not hasattr(torch._C, "_GLIBCXX_USE_CXX11_ABI"):
        return None
    torch_dir = Path(torch.__file__).parent
    include, lib_dir = torch_dir / "include", torch_dir / "lib"
    # (the version define is unused: it keys the cached build by torch's version)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    args = [
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-DREFORMER_TORCH={torch.__version__}",
        f"-I{include}",
        f"-L{lib_dir}",
        "-lc10",
        f"-Wl,-rpath,{lib_dir}",
    ]
    compiler = os.environ.get("CXX", "c++")
    return build.load(SOURCE, compiler, args, "glibc's heap keeps freed memory")
