"""The long-context study's cost per model on an idle machine: a training step (forward +
backward of ``batch_size`` windows of the context) of each model of a ``reformer reproduce
longctx`` scale, each in a fresh process (``reformer.longctx.step_probe``: the median of three
steps after a first one, and the step's peak memory). The study's own timing is summed over its
training sessions, on a machine that other jobs share; this one is taken at one time, with
nothing else running, so the models compare.

    python benchmarks/longctx_cost.py --out docs/long-context-cost.md
    python benchmarks/longctx_cost.py --scale pilot --models full lsh-4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, markdown_table, print_and_write  # noqa: E402

from reformer import longctx  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(longctx.LONGCTX_SCALES), default="cpu")
    parser.add_argument("--models", nargs="+", choices=longctx.ALL_MODELS, default=list(longctx.ALL_MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    cfg = longctx.LONGCTX_SCALES[args.scale]
    probes = {}
    for label in args.models:
        probes[label] = longctx.step_probe(cfg.model_config(label), cfg.batch_size, args.device)
        print(f"{label}: {probes[label]['seconds_per_step']:.2f} s per step", file=sys.stderr)
    base = probes.get("lsh-4")
    rows = [[label, f"{p['seconds_per_step']:.2f}",
             f"{p['seconds_per_step'] / base['seconds_per_step']:.2f}" if base else "-",
             f"{p['peak_bytes'] / 2**20:,.0f}", f"{p['seconds_per_step'] * cfg.steps / 3600:.1f}"]
            for label, p in probes.items()]  # fmt: skip
    lines = [
        f"One training step of {cfg.batch_size} x {cfg.seq_len:,} bytes, dim {cfg.dim}, depth {cfg.depth}, "
        f"{cfg.heads} heads (`--scale {args.scale}`), each model in a fresh process: median of three steps "
        f"after a first one, and the step's peak memory above the memory before it. "
        f"{machine_line(torch.get_num_threads())}",
        "",
        *markdown_table(["model", "s / step", "vs lsh-4", "peak MB", f"hours for {cfg.steps:,} steps"], rows),
    ]
    print_and_write(lines, "longctx_cost.py", sys.argv[1:], args.out)


if __name__ == "__main__":
    main()
