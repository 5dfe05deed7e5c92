"""LSHSelfAttention fwd+bwd time and peak memory vs reformer_pytorch and dense SDPA, on CPU.

Each (system, length) runs in a fresh process so that its peak resident memory can be read
(``ru_maxrss`` minus the resident size just before the first step). Lengths whose step
would exceed ``--max-step-seconds`` (extrapolated from the previous length) are skipped and
marked as such. Prints a Markdown table and writes it to ``--out``. Never asserts.

    python benchmarks/attention.py                      # the default sweep, 1K..64K
    python benchmarks/attention.py --lengths 4096 16384 --systems ours sdpa
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    MEASURE_MEMORY_ENV,
    importable,
    keep_freed_memory,
    kept_memory_text,
    machine_line,
    markdown_table,
    peak_rss_bytes,
    restore_default_malloc,
    rss_bytes,
    run_isolated,
)
from torch import nn

SYSTEMS = ("ours", "reformer_pytorch", "sdpa")
# How a step's time grows when the length doubles, to decide what to skip.
GROWTH = {"ours": 2.2, "reformer_pytorch": 2.2, "sdpa": 4.0}


class DenseSelfAttention(nn.Module):
    """A standard attention layer of the same width: q, k, v projections + SDPA + output."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (b, h, n, dh)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def build(system: str, args: argparse.Namespace) -> nn.Module:
    kw = dict(dim=args.dim, heads=args.heads, bucket_size=args.bucket_size, n_hashes=args.n_hashes, causal=args.causal)
    if system == "ours":
        from reformer import LSHSelfAttention

        return LSHSelfAttention(**kw)
    if system == "reformer_pytorch":
        from reformer_pytorch import LSHSelfAttention as PeerLSHSelfAttention

        return PeerLSHSelfAttention(**kw)
    return DenseSelfAttention(args.dim, args.heads, args.causal)


def measure(system: str, length: int, args: argparse.Namespace) -> dict:
    """In a fresh process: peak memory above the start during a first (warm-up) step, with
    large blocks returned to the OS; then the best fwd+bwd time of ``repeats`` steps, with
    freed memory kept (as ``benchmarks/training.py`` does)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = build(system, args)
    x = torch.randn(args.batch, length, args.dim, requires_grad=True)

    def step() -> float:
        start = time.perf_counter()
        layer(x).sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    before = rss_bytes()
    step()
    mb = max(peak_rss_bytes() - before, 0) / 2**20
    kept = keep_freed_memory() if args.allocator == "kept" else restore_default_malloc()
    return {"ms": 1000 * min(step() for _ in range(args.repeats)), "mb": mb, "kept": kept}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024 * 2**i for i in range(7)])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--bucket-size", type=int, default=64)
    p.add_argument("--n-hashes", type=int, default=4)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--allocator",
        choices=("kept", "default"),
        default="kept",
        help="timed steps with freed memory kept (as reformer train runs) or glibc's default malloc",
    )
    p.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up (best is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-step-seconds", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks-attention-cpu.md"))
    args = p.parse_args(argv)

    for key, value in MEASURE_MEMORY_ENV.items():  # inherited by the measuring processes
        os.environ.setdefault(key, value)
    systems = [s for s in args.systems if s != "reformer_pytorch" or importable("reformer_pytorch")]
    missing = sorted(set(args.systems) - set(systems))
    results: dict[tuple[str, int], dict] = {}
    for system in systems:
        last_s = None
        for length in sorted(args.lengths):
            if last_s is not None and last_s * GROWTH[system] > args.max_step_seconds:
                results[system, length] = {"skip": f"skipped (est. {last_s * GROWTH[system]:.0f} s/step)"}
                last_s *= GROWTH[system]
                continue
            res = run_isolated(measure, system, length, args)
            results[system, length] = res
            last_s = res["ms"] / 1000 if "ms" in res else float("inf")
            print(f"{system:>16} {length:>7}: {_cell(res)}", file=sys.stderr, flush=True)

    table = render(args, systems, missing, results, machine_line(args.threads))
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"written to {args.out}", file=sys.stderr)


def _cell(res: dict) -> str:
    if "ms" in res:
        return f"{res['ms']:,.0f} ms / {res['mb']:,.0f} MB"
    return res.get("skip") or res.get("error", "?")


def render(args, systems, missing, results, machine: str) -> str:
    lengths = sorted(args.lengths)
    head = ["length"] + [f"{s} (ms / MB)" for s in systems]
    ratios = [s for s in systems if s != "ours"] if "ours" in systems else []
    head += [f"{s} / ours (time)" for s in ratios]
    rows = []
    for n in lengths:
        row = [f"{n:,}"] + [_cell(results[s, n]) for s in systems]
        for s in ratios:
            a, b = results[s, n], results["ours", n]
            row.append(f"{a['ms'] / b['ms']:.2f}x" if "ms" in a and "ms" in b else "-")
        rows.append(row)
    lines = [
        "# LSH self-attention on CPU: fwd+bwd per step",
        "",
        f"`LSHSelfAttention(dim={args.dim}, heads={args.heads}, bucket_size={args.bucket_size}, "
        f"n_hashes={args.n_hashes}, causal={args.causal})`, batch {args.batch}; `sdpa` is a dense layer of the "
        "same width (q/k/v projections + `scaled_dot_product_attention`). Time: best of "
        f"{args.repeats} steps after a warm-up, "
        + (
            f"with {kept_memory_text(list(results.values()))}"
            if args.allocator == "kept"
            else "with glibc's default malloc (fresh pages for every block over 32 MiB, its largest mmap threshold)"
        )
        + ". Memory: peak resident set "
        "above the pre-step baseline during the warm-up step, large blocks returned to the OS "
        "(`MALLOC_MMAP_THRESHOLD_=65536`), so it is live memory.",
        "",
        machine,
        "",
        *markdown_table(head, rows),
        "",
        "Command: `python benchmarks/attention.py " + " ".join(sys.argv[1:]) + "`",
    ]
    if missing:
        lines.append(f"Not installed, not measured: {', '.join(missing)} (`pip install -e .[bench]`).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
