"""Keep freed memory in the process for the next step: glibc's malloc, for CPU training.

glibc serves every block over its mmap threshold (which adapts, up to 32 MiB) with fresh pages
from the kernel and hands them back when the block is freed. So each such tensor pays a page
fault per 4 KiB page, every time it is allocated. A CPU training step allocates and frees
activation-sized tensors by the gigabyte: a depth-6 ``ReformerLM`` step at 16K tokens maps
about 14 GB of fresh pages (3.7 million faults, 17% of the step's time on a 2-core machine).
:func:`keep_freed_memory` makes malloc serve every block from its heap and keep what is freed
there, as a GPU caching allocator does (and as Intel's PyTorch launcher sets jemalloc up): the
pages are faulted in during the first steps, then reused. The cost is that the process's
resident memory stays at its peak instead of shrinking between steps.

``reformer train`` and ``reformer reproduce`` call it; ``REFORMER_KEEP_FREED_MEMORY=0`` keeps
glibc's defaults. It changes the whole process, so the library never calls it on its own.
"""

from __future__ import annotations

import ctypes
import os

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


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module doc). Returns whether it
    applied: False with ``REFORMER_KEEP_FREED_MEMORY=0`` or where the C library is not glibc."""
    if os.environ.get("REFORMER_KEEP_FREED_MEMORY", "1") == "0":
        return False
    return mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
