"""What keeping freed memory is worth: CPU steps with glibc's default malloc, with glibc's heap
kept (``reformer.native.allocator.keep_heap``: every block from the heap, never trimmed) and with the
caching CPU allocator (``reformer.native.allocator.keep_freed_memory``, what ``reformer train`` uses).

With glibc's defaults every block over the mmap threshold (which adapts, up to 32 MiB) gets
fresh pages and each of its 4 KiB pages costs a fault when first touched; the steps of long
sequences allocate gigabytes of such blocks. Keeping the heap avoids the faults, but small
blocks settle in the holes freed tensors leave and the heap grows past the live memory. For
each case, in a fresh process: two untimed steps, then the best of ``--repeats`` steps, with
the system CPU time and minor page faults of that step (``getrusage``) and the resident set
above the built model after the steps (what the process holds between steps). Cases: the
``LSHSelfAttention`` layer of ``benchmarks/attention.py`` (fwd+bwd) and the depth-6
``ReformerLM`` training step of ``benchmarks/training.py``. Prints a Markdown table and writes
it to ``--out``. Never asserts.

    python benchmarks/page_faults.py
    python benchmarks/page_faults.py --lm-lengths 4096 16384 32768 --out docs/page-faults-cpu.md
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from common import keep_freed_memory, machine_line, markdown_table, print_and_write, rss_bytes, run_isolated

from reformer.native import allocator

LAYER = dict(dim=512, heads=8, bucket_size=64, n_hashes=4, causal=True)


SETTINGS = {"default": "glibc default", "heap": "glibc heap kept", "pool": "caching allocator"}


def measure(case: str, length: int, setting: str, threads: int, repeats: int) -> dict:
    """One case in a fresh process (the allocator setting is process-wide)."""
    from reformer import LSHSelfAttention, ReformerLM

    if setting == "pool" and keep_freed_memory() != "pool":
        return {"error": "the caching allocator could not be built"}
    if setting == "heap" and not allocator.keep_heap():
        return {"error": "glibc's malloc refused"}
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if case == "attention":
        layer = LSHSelfAttention(**LAYER)
        x = torch.randn(1, length, LAYER["dim"], requires_grad=True)

        def run() -> None:
            layer(x).sum().backward()
            x.grad = None
    else:
        model = ReformerLM(num_tokens=256, depth=6, max_seq_len=length, **LAYER)
        tokens = torch.randint(0, 256, (1, length))

        def run() -> None:
            model(tokens, targets=tokens).backward()
            model.zero_grad(set_to_none=True)

    best, start_rss = None, rss_bytes()
    for i in range(2 + repeats):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        step = {"s": wall, "sys": after.ru_stime - before.ru_stime, "faults": after.ru_minflt - before.ru_minflt}
        if i >= 2 and (best is None or wall < best["s"]):
            best = step
    return {**best, "resident": rss_bytes() - start_rss}


def _cell(res: dict) -> str:
    return f"{res['s']:.2f} s / {res['sys']:.2f} s / {res['faults']:,} / {res['resident'] / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention-lengths", type=int, nargs="*", default=[4096, 16384, 65536])
    p.add_argument("--lm-lengths", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed steps after two untimed ones (best is reported)")
    p.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    cases = [("attention", n) for n in args.attention_lengths] + [("lm", n) for n in args.lm_lengths]
    rows = []
    for case, length in cases:
        res = {k: run_isolated(measure, case, length, k, args.threads, args.repeats) for k in SETTINGS}
        if any("error" in r for r in res.values()):
            print(f"{case} {length}: {res}", file=sys.stderr)
            continue
        name = "`LSHSelfAttention` fwd+bwd" if case == "attention" else "`ReformerLM` depth 6, training step"
        cells = [_cell(r) for r in res.values()]
        pool = res["pool"]
        ratios = [f"{res['default']['s'] / pool['s']:.2f}x", f"{res['heap']['resident'] / pool['resident']:.2f}x"]
        rows.append([name, f"{length:,}", *cells, *ratios])
        print(" | ".join(rows[-1]), file=sys.stderr)
    lines = [
        "# CPU steps with glibc's default malloc, with glibc's heap kept, and with the caching allocator",
        "",
        "Each cell: wall time / system CPU time / minor page faults of one step (best of "
        f"{args.repeats} after two untimed steps, each case in a fresh process) / resident set above the built "
        'model after the steps. "glibc heap kept": `reformer.native.allocator.keep_heap()` (every block from the heap, '
        'never trimmed; the fallback where the allocator cannot be built); "caching allocator": '
        "`reformer.native.allocator.keep_freed_memory()` (what `reformer train` does). Layer: "
        "`LSHSelfAttention(dim=512, heads=8, bucket_size=64, n_hashes=4, causal=True)`, batch 1; the LM is "
        "`ReformerLM(num_tokens=256, depth=6)` with the same layer options.",
        "",
        machine_line(args.threads),
        "",
        *markdown_table(
            ["case", "length", *SETTINGS.values(), "default / allocator (time)", "heap / allocator (resident)"], rows
        ),
    ]
    print_and_write(lines, "page_faults.py", argv if argv is not None else sys.argv[1:], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
