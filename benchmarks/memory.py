"""Peak memory of one ReformerLM training step vs depth: reversible, plain, reformer_pytorch.

``ReformerLM(num_tokens=256, dim=512, heads=8, bucket_size=64, n_hashes=4, causal=True)``,
batch 1, one step (forward, cross-entropy, backward). Each case runs in a fresh process;
memory is the peak resident set above the resident set after building the model (so it
includes gradients, activations and temporaries, not the weights). Cases whose step would
exceed ``--max-step-seconds`` (extrapolated from the previous depth) are skipped. Prints a
Markdown table and writes it to ``--out``. Never asserts.

    python benchmarks/memory.py
    python benchmarks/memory.py --lengths 4096 --depths 2 6
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import importable, machine_line, markdown_table, peak_rss_bytes, rss_bytes, run_isolated

SYSTEMS = ("reversible", "plain", "reformer_pytorch")


def measure(system: str, length: int, depth: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kw = dict(
        num_tokens=256, dim=512, depth=depth, max_seq_len=length, heads=8, bucket_size=64, n_hashes=4, causal=True
    )
    if system == "reformer_pytorch":
        from reformer_pytorch import ReformerLM as PeerReformerLM

        model = PeerReformerLM(**kw)
    else:
        from reformer import ReformerLM

        model = ReformerLM(**kw, reverse_thres=0 if system == "reversible" else 10**9)
    tokens = torch.randint(0, 256, (1, length))
    before = rss_bytes()
    start = time.perf_counter()
    logits = model(tokens)
    F.cross_entropy(logits.view(-1, 256), tokens.view(-1)).backward()
    seconds = time.perf_counter() - start
    grads_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"s": seconds, "mb": max(peak_rss_bytes() - before, 0) / 2**20, "grads_mb": grads_mb}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 6, 12])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-step-seconds", type=float, default=180.0)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks-memory-cpu.md"))
    args = p.parse_args(argv)
    # Large blocks straight from and back to the OS, so that the peak resident set measures live
    # memory rather than the allocator's high-water mark (glibc reads this when a process starts).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    systems = [s for s in args.systems if s != "reformer_pytorch" or importable("reformer_pytorch")]

    results = {}
    for system in systems:
        for length in args.lengths:
            last = None
            for depth in sorted(args.depths):
                if last is not None and last["s"] * depth / last["depth"] > args.max_step_seconds:
                    results[system, length, depth] = {
                        "skip": f"skipped (est. {last['s'] * depth / last['depth']:.0f} s)"
                    }
                    continue
                res = run_isolated(measure, system, length, depth, args.threads)
                results[system, length, depth] = res
                if "s" in res:
                    last = {**res, "depth": depth}
                print(f"{system:>16} {length:>6} depth {depth:>2}: {_cell(res)}", file=sys.stderr, flush=True)

    head = ["length", "depth", "weight grads (ours)", *systems]
    if "reformer_pytorch" in systems and "reversible" in systems:
        head.append("reformer_pytorch / reversible (memory)")
    rows = []
    for length in args.lengths:
        for depth in sorted(args.depths):
            ours = results.get(("reversible", length, depth), {})
            grads = f"{ours['grads_mb']:,.0f} MB" if "grads_mb" in ours else "-"
            row = [f"{length:,}", str(depth), grads, *(_cell(results[s, length, depth]) for s in systems)]
            if len(head) > len(row):
                a, b = results["reformer_pytorch", length, depth], results["reversible", length, depth]
                row.append(f"{a['mb'] / b['mb']:.2f}x" if "mb" in a and "mb" in b else "-")
            rows.append(row)
    lines = [
        "# Training-step memory vs depth (CPU)",
        "",
        "`ReformerLM(num_tokens=256, dim=512, heads=8, bucket_size=64, n_hashes=4, causal=True)`, batch 1, one "
        "step: forward, cross-entropy, backward. Memory: peak resident set above the model's own (weight "
        "gradients, activations, temporaries), with glibc returning large blocks to the OS "
        "(`MALLOC_MMAP_THRESHOLD_=65536`) so that it measures live memory, not allocator high-water. "
        "`reversible` is our default; `plain` the same model with ordinary autograd (`reverse_thres` above "
        "the length); `reformer_pytorch` 1.4.4 with the same options. Time: that one step, slowed by the "
        "allocator setting (fresh pages for every large tensor); `benchmarks/attention.py` measures speed.",
        "",
        machine_line(args.threads),
        "",
        *markdown_table(head, rows),
        "",
        "Command: `python benchmarks/memory.py " + " ".join(sys.argv[1:]) + "`",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)


def _cell(res: dict) -> str:
    if "mb" in res:
        return f"{res['mb']:,.0f} MB / {res['s']:.1f} s"
    return res.get("skip") or res.get("error", "?")


if __name__ == "__main__":
    main()
