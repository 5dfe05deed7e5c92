"""Peak memory of a ReformerLM training step with a large vocabulary: the loss on the full
logits (``F.cross_entropy(model(x), y)``) vs the chunked loss (``model(x, targets=y)``).

Each case runs in a fresh process with glibc handing large blocks straight back to the OS, so
the peak resident set above the built model is the step's live memory (see training.py).
Memory only: the machine may be busy. Never asserts.

    python benchmarks/loss_memory.py                      # 16K tokens, vocabulary 32K
    python benchmarks/loss_memory.py --length 4096 --num-tokens 8192 --out /tmp/loss.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import MEASURE_MEMORY_ENV, markdown_table, peak_rss_bytes, print_and_write, rss_bytes, run_isolated

LOSSES = ("full logits", "chunked")


def measure(loss: str, length: int, num_tokens: int, dim: int, depth: int) -> dict:
    """One training step's peak memory (MB above the built model) and time, in this process."""
    from reformer import ReformerLM

    torch.manual_seed(0)
    model = ReformerLM(num_tokens=num_tokens, dim=dim, depth=depth, heads=4, bucket_size=64, n_hashes=2,
                       max_seq_len=length, causal=True)  # fmt: skip
    tokens = torch.randint(0, num_tokens, (1, length + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    # Both cases first run a short chunked step: its first use imports torch's checkpointing
    # machinery (about 120 MB of modules, once per process), which is no part of a step.
    model(inputs[:, :64], targets=targets[:, :64]).backward()
    model.zero_grad(set_to_none=True)
    before, start = rss_bytes(), time.perf_counter()
    if loss == "chunked":
        value = model(inputs, targets=targets)
    else:
        value = F.cross_entropy(model(inputs).transpose(1, 2), targets)
    value.backward()
    seconds = time.perf_counter() - start
    return {"mb": max(peak_rss_bytes() - before, 0) / 2**20, "s": seconds, "loss": value.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--num-tokens", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs" / "loss-memory-cpu.md")
    args = parser.parse_args()
    for key, value in MEASURE_MEMORY_ENV.items():  # inherited by the measuring processes
        os.environ.setdefault(key, value)
    logits_mb = args.length * args.num_tokens * 4 / 2**20
    rows, results = [], {}
    for loss in LOSSES:
        res = results[loss] = run_isolated(measure, loss, args.length, args.num_tokens, args.dim, args.depth)
        if "error" in res:
            rows.append([loss, res["error"], "-", "-"])
        else:
            rows.append([loss, f"{res['mb']:,.0f}", f"{res['s']:.1f}", f"{res['loss']:.6f}"])
        print(rows[-1], file=sys.stderr)
    full, chunked = (results[name].get("mb") for name in LOSSES)
    ratio = f"{full / chunked:.1f}x less" if full and chunked else "n/a"
    lines = [
        "# Peak memory of an LM training step: full logits vs chunked loss (CPU)",
        "",
        f"ReformerLM num_tokens={args.num_tokens:,}, dim={args.dim}, depth={args.depth}, heads 4, bucket 64, "
        f"n_hashes 2, batch 1 x {args.length:,} tokens, fp32, torch {torch.__version__}. One forward + backward per "
        "fresh process; peak resident memory above the built model, with glibc returning large blocks to the OS. "
        f"The full logits alone are {logits_mb:,.0f} MB in fp32.",
        "",
        *markdown_table(["loss", "peak MB", "step s (machine shared, indicative)", "loss value"], rows),
        "",
        f"Chunked: {ratio} memory; the two loss values agree (same model, same tokens).",
    ]
    print_and_write(lines, "loss_memory.py", sys.argv[1:], args.out)


if __name__ == "__main__":
    main()
