"""How often angular LSH puts a vector's nearest neighbours in its bucket: exact vs factorised
bucket counts, and what the hashing costs.

Synthetic shared-QK vectors: ``--clusters`` random centres plus Gaussian noise (three noise
levels), ``--length`` positions of width 64. For every 4th position, its ``--top`` nearest
neighbours by angle; the recall is the fraction of them that share its bucket in at least one
of ``--n-hashes`` rounds. Compared: ``n_buckets = length // 64`` exact (``n/2`` projections per
round) and the factorised pair of the same count (``~sqrt(n)`` projections). Also the time
to hash 8 rows (heads) of the sequence. Prints a Markdown table and writes it to ``--out``.
Never asserts.

    python benchmarks/bucket_recall.py
    python benchmarks/bucket_recall.py --length 65536 --out /tmp/recall.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from common import keep_freed_memory, machine_line, markdown_table, print_and_write

from reformer.hashing import draw_rotations, hash_vectors

NOISE = (0.5, 1.0, 2.0)


def factorised(n: int) -> tuple[int, int]:
    """Two even factors near ``sqrt(n)`` with at least ``n`` buckets in all."""
    first = 2 * max(1, round(math.sqrt(n) / 2))
    return first, 2 * math.ceil(n / (2 * first))


def recall(x: torch.Tensor, spec, n_hashes: int, top: int) -> float:
    """Fraction of the ``top`` nearest neighbours of every 4th position sharing a bucket with it."""
    unit = torch.nn.functional.normalize(x, dim=-1)
    queries = torch.arange(0, x.shape[0], 4)
    sim = unit[queries] @ unit.T
    sim[torch.arange(len(queries)), queries] = -2  # not itself
    neighbours = sim.topk(top, dim=-1).indices  # (q, top)
    buckets = hash_vectors(x[None], draw_rotations(x.shape[1], n_hashes, spec, seed=1), spec)[0]  # (h, len)
    same = buckets[:, queries][:, :, None] == buckets[:, neighbours]  # (h, q, top)
    return same.any(0).float().mean().item()


def hash_ms(length: int, spec, n_hashes: int) -> float:
    x = torch.randn(8, length, 64)
    rotations = draw_rotations(64, n_hashes, spec)
    hash_vectors(x, rotations, spec)
    start = time.perf_counter()
    hash_vectors(x, rotations, spec)
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--clusters", type=int, default=512)
    p.add_argument("--n-hashes", type=int, default=4)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    keep_freed_memory()
    torch.manual_seed(0)
    n = args.length // 64
    specs = {f"exact {n}": n, "factorised {}x{}".format(*factorised(n)): factorised(n)}
    rows = []
    for name, spec in specs.items():
        scores = []
        for noise in NOISE:
            centres = torch.randn(args.clusters, 64)
            x = centres[torch.randint(0, args.clusters, (args.length,))] + noise * torch.randn(args.length, 64)
            scores.append(f"{recall(x, spec, args.n_hashes, args.top):.3f}")
        per_round = n // 2 if isinstance(spec, int) else sum(spec) // 2
        rows.append([name, str(per_round), *scores, f"{hash_ms(args.length, spec, args.n_hashes):,.0f}"])
    lines = [
        f"# Nearest-neighbour recall of LSH buckets, {args.length:,} positions",
        "",
        f"Top-{args.top} neighbours by angle sharing a bucket in any of {args.n_hashes} rounds; "
        f"{args.clusters} clusters, noise = std of the offsets from the centres (unit-variance centres).",
        "",
        machine_line(torch.get_num_threads(), None),
        "",
        *markdown_table(
            ["buckets", "projections per round", *(f"recall, noise {s}" for s in NOISE), "hash 8 heads (ms)"], rows
        ),
    ]
    print_and_write(lines, "bucket_recall.py", sys.argv[1:] if argv is None else argv, args.out)


if __name__ == "__main__":
    main()
