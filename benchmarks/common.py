"""Helpers shared by the benchmark scripts: run a measurement in a fresh process and read its
peak resident memory, machine facts, Markdown tables, atomic output files."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import multiprocessing as mp
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from reformer import allocator
from reformer.atomic import atomic_write


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(fn: Callable[..., dict], args: tuple, queue: mp.Queue) -> None:
    try:
        queue.put(fn(*args))
    except Exception as exc:  # report, do not crash the sweep
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _short_error(text: str) -> str:
    """Allocation failures (under a memory cap, or the OOM killer's SIGKILL) read "out of memory";
    other errors are cut to a table cell."""
    if any(sign in text for sign in ("can't allocate memory", "MemoryError", "DefaultCPUAllocator", "exit code -9")):
        return "out of memory"
    return text[:80]


def run_isolated(fn: Callable[..., dict], *args: object) -> dict:
    """``fn(*args)`` in a fresh spawned process (so its peak memory is its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    proc.join()
    res = queue.get() if not queue.empty() else {"error": f"killed (exit code {proc.exitcode})"}
    return {"error": _short_error(res["error"])} if "error" in res else res


#: Set in the environment of the measuring processes: glibc hands every block above 64 KiB
#: straight back to the OS, so that the peak resident set of the first step is live memory,
#: not the allocator's high-water mark.
MEASURE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def keep_freed_memory() -> str | None:
    """For the timed steps, after the memory step: freed memory kept for the next step
    (:func:`reformer.allocator.keep_freed_memory`: torch's CPU tensors from the caching pool, or
    from glibc's heap where the pool cannot be built), as ``reformer train`` runs. Otherwise every
    tensor over glibc's mmap threshold (64 KiB in the memory step, at most 32 MiB by default)
    would time the kernel's page faults, for every system alike. Returns how (see there)."""
    how = allocator.keep_freed_memory()
    if how is None:
        print("note: freed memory could not be kept; times include page faults")
    return how


def kept_memory_text(results: list[dict]) -> str:
    """How the timed steps of ``results`` (each with the ``"kept"`` of :func:`keep_freed_memory`)
    kept freed memory, for a report."""
    names = {"pool": "the caching CPU allocator", "heap": "glibc's malloc keeping its heap", None: "nothing"}
    by = " / ".join(sorted({names[r["kept"]] for r in results if "kept" in r}))
    how = f"freed memory kept{f' by {by}' if by else ''}"
    return f"{how} (`reformer.allocator.keep_freed_memory`, as `reformer train` runs)"


def restore_default_malloc() -> None:
    """After the memory step's fixed 64 KiB mmap threshold: glibc's defaults as they settle in a
    process that frees large tensors (the mmap threshold grown to its 32 MiB maximum, the trim
    threshold to twice that), so every larger block gets fresh pages each time."""
    allocator.mallopt(allocator.M_MMAP_THRESHOLD, 32 * 2**20)
    allocator.mallopt(allocator.M_TRIM_THRESHOLD, 64 * 2**20)


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def gemm_gflops(threads: int) -> float:
    """Measured fp32 matmul rate of this machine."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def machine_line(threads: int, gflops: float | None = None, libraries: tuple[str, ...] = ()) -> str:
    """One line naming the machine, the versions compared and its GEMM rate (measured now unless
    the caller measured it already); ``libraries``: distributions whose versions to add."""
    versions = "".join(f", {name} {_version(name)}" for name in libraries)
    rate = gemm_gflops(threads) if gflops is None else gflops
    return (
        f"Machine: {platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}{versions}; fp32 GEMM {rate:.0f} GFLOP/s."
    )


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (and its missing parents) through :func:`reformer.atomic.atomic_write`,
    so an interrupted run never leaves a half-written table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def print_and_write(lines: list[str], script: str, argv: list[str], out: Path | None) -> None:
    """Print a Markdown report, ending in the command that made it, and write it to ``out``."""
    text = "\n".join([*lines, "", f"Command: `python benchmarks/{script} " + " ".join(argv) + "`"]) + "\n"
    print(text)
    if out:
        write_atomic(out, text)


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def hf_reformer_lm(
    *, dim: int, heads: int, depth: int, bucket_size: int, n_hashes: int, num_buckets: int, **config: object
):
    """Hugging Face's causal ``ReformerModelWithLMHead`` with every layer LSH, built from a config
    (no download), byte vocabulary and no dropout; ``config`` adds or overrides fields
    (positions, activation, hash seed)."""
    from transformers import ReformerConfig, ReformerModelWithLMHead

    fields = dict(
        vocab_size=256,
        hidden_size=dim,
        num_attention_heads=heads,
        attention_head_size=dim // heads,
        attn_layers=["lsh"] * depth,
        feed_forward_size=4 * dim,
        lsh_attn_chunk_length=bucket_size,
        num_hashes=n_hashes,
        num_buckets=num_buckets,
        is_decoder=True,
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        eos_token_id=None,
    )
    return ReformerModelWithLMHead(ReformerConfig(**{**fields, **config}))
