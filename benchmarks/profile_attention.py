"""Where the time of one ``LSHSelfAttention`` fwd+bwd step goes, on CPU.

Wall time of the step split into the hashing, the LSH window attention (forward and backward
of the chunked path) and the rest (projections, head reshapes, autograd), and inside the
chunked path the time spent in its batched matmuls, its fused C row kernels (fp32) or its
gathers and scatter-adds (other dtypes), with the
matmul rate against the machine's GEMM rate. Timers wrap the functions (CPU ops are
synchronous, so wall time per call is exact); no sampling, no profiler overhead inside ops.
Measured like ``benchmarks/attention.py``: a warm-up step, then freed memory kept.

    python benchmarks/profile_attention.py                 # 16K tokens
    python benchmarks/profile_attention.py --length 65536 --out docs/profile-attention-cpu.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from common import gemm_gflops, keep_freed_memory, machine_line, markdown_table, print_and_write

from reformer import LSHSelfAttention, cpu_kernels, cpu_workers, hashing
from reformer.attention import chunked, lsh, window_kernels, window_torch

SECONDS: dict[str, float] = defaultdict(float)
FLOPS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(name: str, fn: Callable, flops: Callable | None = None) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        SECONDS[name] += time.perf_counter() - start
        CALLS[name] += 1
        if flops is not None:
            FLOPS[name] += flops(*args)
        return result

    return wrapper


def bmm_flops(a: torch.Tensor, b: torch.Tensor, *_) -> float:
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


#: The fused C kernels of the fp32 CPU path (reformer/cpu_kernels.c), timed per kind.
KERNELS = {
    "gather_rows": "  row kernels: gathers",
    "strict_softmax": "  row kernels: masks, softmax, lse",
    "softmax": "  row kernels: masks, softmax, lse",
    "softmax_backward_": "  row kernels: softmax backward",
    "window_grads_to_rows_": "  row kernels: window gradients to rows",
    "accumulate_rounds_": "  row kernels: combining rounds",
    "finish_rounds_": "  row kernels: combining rounds",
    "pack_qkv_": "  row kernels: packing q, k, v and folding their gradient",
    "fold_qk_grad_": "  row kernels: packing q, k, v and folding their gradient",
    "strict_windows_forward_": "  fused window kernels: forward (matmuls, softmax, rounds)",
    "strict_windows_backward_": "  fused window kernels: backward (matmuls, softmax, gradients to rows)",
}


def instrument() -> None:
    """Wrap what the chunked path calls (module attributes, so only its calls are counted)."""
    window_torch.torch = window_kernels.torch = _TorchProxy()
    for name, label in KERNELS.items():
        setattr(cpu_kernels, name, timed(label, getattr(cpu_kernels, name)))
    lsh.hash_vectors = timed("hashing", hashing.hash_vectors)  # as lsh.py imported it
    chunked._LSHWindows.forward = staticmethod(timed("window attention forward", chunked._LSHWindows.forward))
    chunked._LSHWindows.backward = staticmethod(timed("window attention backward", chunked._LSHWindows.backward))


class _TorchProxy:
    """``torch`` as seen by the chunked path's window modules, with its matmuls timed; gathers and
    scatter-adds are tensor methods, timed by wrapping them on ``torch.Tensor`` while the step runs."""

    bmm = staticmethod(timed("  batched matmuls", torch.bmm, bmm_flops))

    def __getattr__(self, name):
        return getattr(torch, name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = LSHSelfAttention(dim=512, heads=8, bucket_size=64, n_hashes=4, causal=True)
    x = torch.randn(1, args.length, 512, requires_grad=True)
    keep_freed_memory()
    layer(x).sum().backward()  # warm-up (faults the heap's pages in)
    start = time.perf_counter()
    layer(x).sum().backward()
    as_run = time.perf_counter() - start
    # The breakdown runs on one thread (the blocks on the calling thread, torch ops and kernels
    # single-threaded), so that the timers measure wall time and add up to the step; its shares
    # are those of the work one core does.
    cpu_workers.worker_count = lambda: 1
    torch.set_num_threads(1)
    instrument()
    index_select, index_add = torch.Tensor.index_select, torch.Tensor.index_add_
    torch.Tensor.index_select = timed("  gathers (index_select)", index_select)
    torch.Tensor.index_add_ = timed("  scatter-adds (index_add_)", index_add)
    start = time.perf_counter()
    layer(x).sum().backward()
    total = time.perf_counter() - start
    torch.Tensor.index_select, torch.Tensor.index_add_ = index_select, index_add
    gflops = gemm_gflops(args.threads)
    gflops_one = gemm_gflops(1)

    def row(name: str, seconds: float, note: str = "") -> list[str]:
        return [name, f"{seconds * 1e3:,.0f}", f"{seconds / total:.0%}", note]

    windows = SECONDS["window attention forward"] + SECONDS["window attention backward"]
    rows = [row("whole step", total)]
    for name in ("hashing", "window attention forward", "window attention backward"):
        rows.append(row(name, SECONDS[name], f"{CALLS[name]} calls"))
    labels = ["  batched matmuls", "  gathers (index_select)", "  scatter-adds (index_add_)", *KERNELS.values()]
    for name in dict.fromkeys(labels):
        if CALLS[name]:
            rate = f", {FLOPS[name] / SECONDS[name] / 1e9:.0f} GFLOP/s" if FLOPS[name] else ""
            rows.append(row(name, SECONDS[name], f"{CALLS[name]} calls{rate}"))
    parts = sum(t for name, t in SECONDS.items() if name.startswith("  "))
    rows.append(row("  the rest of the window attention (torch ops and Python between the above)", windows - parts))
    rows.append(row("projections, head reshapes, autograd", total - windows - SECONDS["hashing"]))
    lines = [
        f"# Where the time of an LSHSelfAttention step goes ({args.length:,} tokens, CPU)",
        "",
        "`LSHSelfAttention(dim=512, heads=8, bucket_size=64, n_hashes=4, causal=True)`, batch 1, one fwd+bwd "
        'step after a warm-up (freed memory kept). Indented rows are parts of the window attention; "row '
        "kernels\" are the fused C kernels of `reformer/cpu_kernels.c`. The breakdown's step runs on one "
        f"thread (fp32 GEMM {gflops_one:.0f} GFLOP/s there), so that its timers add up and its shares are "
        f"those of one core's work; as normally run, with {args.threads} threads and the CPU worker threads "
        f"(`reformer/cpu_workers.py`), the step took {as_run * 1e3:,.0f} ms.",
        "",
        machine_line(args.threads, gflops),
        "",
        *markdown_table(["part", "ms", "share", "notes"], rows),
    ]
    print_and_write(lines, "profile_attention.py", sys.argv[1:] if argv is None else argv, args.out)


if __name__ == "__main__":
    main()
