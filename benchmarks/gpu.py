"""LSH attention backends on CUDA: fwd+bwd time, peak memory, HBM bandwidth and TFLOP/s vs
dense SDPA (causal, flash), 4K to 1M tokens; then whole ReformerLM training steps.

Attention: 8 heads, head dim 64, bucket 64, n_hashes 1/2/4/8, bf16, strict causal, random
buckets (``len // 64`` per round). Achieved bandwidth and FLOP/s use a model of the fused
schedule (``lsh_work``), so they compare backends on the same work, not the bytes each one
really moves. A case estimated (from the same series at the previous length: linear in length
for LSH, quadratic for SDPA) to take longer than ``--case-seconds`` in all is not run: SDPA's
time is then extrapolated and marked so. A case that fails (a kernel that does not compile, out
of memory) records its error and the sweep goes on; ``--backends`` runs a subset, so a
backend that breaks the CUDA context can be given its own process (benchmarks/gpu_check.sh
does). Reports are rewritten after every case (``attention.md`` / ``model.md`` in ``--out-dir``,
their rows as JSON beside them), so a run stopped by a time limit keeps what it measured.

    python benchmarks/gpu.py                        # the full sweep (an H100/H200: ~10 min)
    python benchmarks/gpu.py --lengths 4096 65536 --n-hashes 2 --skip-model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import markdown_table, write_atomic

from reformer import ReformerLM
from reformer.attention.backends import lsh_attention, unavailable_reason
from reformer.attention.options import LSHOptions

HEADS, DIM_HEAD, BUCKET = 8, 64, 64
BACKENDS = ("chunked", "sdpa", "flex", "triton")


DEVICE, DTYPE = "cuda", torch.bfloat16  # --device cpu: a dry run of the script's logic on small sizes (memory reads 0)


def timed(step, repeats: int = 3) -> tuple[float, float, float]:
    """Median seconds of ``step()`` after a warm-up (compiles), its peak memory above what was
    allocated before it, and ``torch.cuda.max_memory_allocated`` during it, in bytes."""
    cuda = DEVICE == "cuda"
    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return sorted(times)[len(times) // 2], peak - base, peak


def lsh_step(backend: str, length: int, n_hashes: int):
    qk = torch.randn(HEADS, length, DIM_HEAD, device=DEVICE, dtype=DTYPE, requires_grad=True)
    v = torch.randn_like(qk, requires_grad=True)
    n_buckets = max(2, length // BUCKET // 2 * 2)
    buckets = torch.randint(0, n_buckets, (HEADS, n_hashes, length), device=DEVICE)
    options = LSHOptions(bucket_size=BUCKET, n_hashes=n_hashes, causal=True, attn_backend=backend)

    def step():
        out, _ = lsh_attention(qk, v, buckets, options, n_buckets=n_buckets)
        out.backward(torch.ones_like(out))

    return step


def sdpa_step(length: int):
    q, k, v = (torch.randn(1, HEADS, length, DIM_HEAD, device=DEVICE, dtype=DTYPE) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    flash = torch.nn.attention.SDPBackend.FLASH_ATTENTION if DEVICE == "cuda" else torch.nn.attention.SDPBackend.MATH

    def step():
        with torch.nn.attention.sdpa_kernel(flash):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))

    return step


def lsh_work(length: int, n_hashes: int) -> tuple[float, float]:
    """Modelled (FLOPs, HBM bytes) of one fused fwd+bwd: per round and query, a window of
    2 * BUCKET keys; forward 2 matmuls, backward 5 (flash-attention convention, 3.5x forward);
    bf16 reads of q, k, v (keys and values twice: own and neighbour chunk), do; fp32 per-slot
    gradients written and summed over rounds."""
    slots = HEADS * n_hashes * length
    flops = 3.5 * 4 * slots * 2 * BUCKET * DIM_HEAD
    row = DIM_HEAD * 2  # bytes of one bf16 row
    forward = slots * row * (1 + 2 + 2 + 1)  # q, k x2, v x2, out
    backward = slots * row * (2 * (1 + 2 + 2 + 1) + 2) + slots * DIM_HEAD * 4 * 3 * 2  # two kernels; dq dk dv
    return flops, forward + backward


def sdpa_flops(length: int) -> float:
    return 3.5 * 2 * HEADS * length * length * DIM_HEAD  # causal: half of 4 * L^2 * d


class Sweep:
    """The attention cases in order, each measured, skipped or extrapolated; rows kept."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.rows, self.seconds = args, [], {}  # seconds: (backend, n_hashes) -> (length, s)
        self.started = time.perf_counter()

    def run(self) -> None:
        """Series by series, in the order of ``--backends``: a backend that breaks the CUDA
        context (put it last) spoils no other backend's series."""
        for backend in self.args.backends:
            for n_hashes in [None] if backend == "sdpa" else self.args.n_hashes:
                for length in self.args.lengths:
                    self.case(backend, length, n_hashes)

    def case(self, backend: str, length: int, n_hashes: int | None) -> None:
        row = {"tokens": length, "n_hashes": n_hashes, "backend": backend}
        estimate = self.estimate(backend, length, n_hashes)
        if time.perf_counter() - self.started > self.args.deadline:
            row["status"] = "not run (--deadline reached)"
        elif estimate is not None and estimate * 4 > self.args.case_seconds:  # warm-up + 3 repeats
            row["status"] = "extrapolated" if backend == "sdpa" else "not run (estimated over --case-seconds)"
            row["ms"] = estimate * 1e3
        else:
            probe = torch.empty(1, 1, DIM_HEAD, device=DEVICE, dtype=DTYPE, requires_grad=True)
            reason = unavailable_reason(backend, probe, probe, BUCKET) if backend in ("triton", "flex") else None
            row.update(self.measure(backend, length, n_hashes) if reason is None else {"status": f"n/a ({reason})"})
        if row.get("status") in (None, "extrapolated"):
            self.seconds[backend, n_hashes] = (length, row["ms"] / 1e3)
        if "status" not in row:
            flops, moved = (sdpa_flops(length), None) if backend == "sdpa" else lsh_work(length, n_hashes)
            row["tflops"] = flops / (row["ms"] / 1e3) / 1e12
            row["gbs"] = None if moved is None else moved / (row["ms"] / 1e3) / 1e9
        self.rows.append(row)
        self.rows.sort(key=lambda r: (r["tokens"], r["n_hashes"] or 0, BACKENDS.index(r["backend"])))
        print(json.dumps(row), file=sys.stderr, flush=True)
        self.write()

    def estimate(self, backend: str, length: int, n_hashes: int | None) -> float | None:
        """Seconds per step, scaled from the same series at a shorter length, or None."""
        if (backend, n_hashes) not in self.seconds:
            return None
        shorter, seconds = self.seconds[backend, n_hashes]
        return seconds * (length / shorter) ** (2 if backend == "sdpa" else 1)

    def measure(self, backend: str, length: int, n_hashes: int | None) -> dict:
        try:
            step = sdpa_step(length) if backend == "sdpa" else lsh_step(backend, length, n_hashes)
            seconds, peak, _ = timed(step)
        except torch.OutOfMemoryError:
            return {"status": "out of memory"}
        except Exception as exc:  # a kernel that fails to compile or launch: record it, go on
            return {"status": f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
        finally:
            _empty_cache()
        return {"ms": seconds * 1e3, "peak_mb": peak / 2**20}

    def write(self) -> None:
        sdpa_ms = {r["tokens"]: r["ms"] for r in self.rows if r["backend"] == "sdpa" and "ms" in r}
        for r in self.rows:
            if r["backend"] != "sdpa" and "status" not in r and r["tokens"] in sdpa_ms:
                r["speedup_vs_sdpa"] = sdpa_ms[r["tokens"]] / r["ms"]
        table = [
            [
                f"{r['tokens']:,}",
                "-" if r["n_hashes"] is None else str(r["n_hashes"]),
                "sdpa (flash, causal)" if r["backend"] == "sdpa" else r["backend"],
                _cell(r, "ms", "{:,.1f}"),
                _cell(r, "peak_mb", "{:,.0f}"),
                _cell(r, "gbs", "{:,.0f}"),
                _cell(r, "tflops", "{:.1f}"),
                _cell(r, "speedup_vs_sdpa", "{:.2f}x"),
            ]
            for r in self.rows
        ]
        head = ["tokens", "n_hashes", "backend", "ms", "peak MB", "GB/s (model)", "TFLOP/s (model)", "SDPA ms / ms"]
        _write_report(
            self.args.out_dir / "attention.md",
            "LSH attention fwd+bwd (8 heads, head dim 64, bucket 64, bf16, strict causal)",
            markdown_table(head, table),
            self.rows,
        )


def _cell(row: dict, key: str, fmt: str) -> str:
    if row.get("status") not in (None, "extrapolated"):
        return row["status"] if key == "ms" else "-"
    value = row.get(key)
    if value is None:
        return "-"
    return fmt.format(value) + (" (extrapolated)" if key == "ms" and row.get("status") else "")


def model_rows(args: argparse.Namespace) -> None:
    """A whole ReformerLM training step (depth 6, dim 512, bf16 autocast, chunked loss, AdamW)
    per length; the report is rewritten after each."""
    rows, table = [], []
    for length in args.model_lengths:
        row = {"tokens": length}
        try:
            row.update(_model_step(length))
            table.append([f"{length:,}", f"{row['ms']:,.0f}", f"{row['max_allocated_mb']:,.0f}"])
        except torch.OutOfMemoryError:
            row["status"] = "out of memory"
        except Exception as exc:
            row["status"] = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        if "status" in row:
            table.append([f"{length:,}", row["status"], "-"])
        _empty_cache()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        _write_report(
            args.out_dir / "model.md",
            "ReformerLM training step (depth 6, dim 512, n_hashes 4, bf16 autocast, chunked loss, AdamW)",
            markdown_table(["tokens", "ms", "peak MB (torch.cuda.max_memory_allocated)"], table),
            rows,
        )


def _model_step(length: int) -> dict:
    model = ReformerLM(num_tokens=256, dim=512, depth=6, heads=8, bucket_size=BUCKET, n_hashes=4,
                       causal=True, max_seq_len=length).to(DEVICE)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (1, length + 1), device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):  # chunked loss: no (L, 256) logits held
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, _, peak = timed(step)
    return {"ms": seconds * 1e3, "max_allocated_mb": peak / 2**20}


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _write_report(out: Path, title: str, table: list[str], rows: list[dict]) -> None:
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run)"
    lines = [
        f"## {title}",
        "",
        f"{device}, torch {torch.__version__}. `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`",
        "",
        *table,
    ]
    write_atomic(out, "\n".join(lines) + "\n")
    write_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    parser.add_argument("--n-hashes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--case-seconds", type=float, default=30.0, help="skip a case estimated to take longer")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="start no case after these seconds")
    parser.add_argument("--model-lengths", type=int, nargs="+", default=[65536, 262144, 1048576])
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent.parent / "docs" / "gpu")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: dry run of the logic")
    args = parser.parse_args()
    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (--device cpu for a dry run)")
    if not args.skip_attention:
        Sweep(args).run()
    if not args.skip_model:
        model_rows(args)


if __name__ == "__main__":
    main()
