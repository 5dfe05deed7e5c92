"""LSH attention backends on CUDA: fwd+bwd time, peak memory, HBM bandwidth and TFLOP/s vs
dense SDPA (causal, flash), 4K to 1M tokens; then whole ReformerLM training steps.

Attention: 8 heads, head dim 64, bucket 64, n_hashes 1/2/4/8, bf16, strict causal, random
buckets (``len // 64`` per round). Dense SDPA runs until it no longer fits. Achieved
bandwidth and FLOP/s use a model of the fused schedule (below), so they compare backends on
the same work, not the bytes each one really moves. Writes docs/benchmarks-gpu.md.

    python benchmarks/gpu.py                        # the full sweep (an H100/H200: ~10 min)
    python benchmarks/gpu.py --lengths 4096 65536 --n-hashes 2 --skip-model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import markdown_table

from reformer import ReformerLM
from reformer.attention.backends import lsh_attention, unavailable_reason

HEADS, DIM_HEAD, BUCKET = 8, 64, 64
BACKENDS = ("chunked", "triton", "flex")


def timed(step, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of ``step()`` after a warm-up (compiles), and its peak memory in bytes."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() - base


def lsh_step(backend: str, length: int, n_hashes: int):
    qk = torch.randn(HEADS, length, DIM_HEAD, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(qk, requires_grad=True)
    n_buckets = max(2, length // BUCKET // 2 * 2)
    buckets = torch.randint(0, n_buckets, (HEADS, n_hashes, length), device="cuda")

    def step():
        out, _ = lsh_attention(qk, v, buckets, backend=backend, bucket_size=BUCKET, n_buckets=n_buckets, causal=True)
        out.backward(torch.ones_like(out))

    return step


def sdpa_step(length: int):
    q, k, v = (torch.randn(1, HEADS, length, DIM_HEAD, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()

    def step():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
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


def attention_rows(lengths: list[int], n_hashes_list: list[int]) -> list[list[str]]:
    rows = []
    for length in lengths:
        for n_hashes in n_hashes_list:
            for backend in BACKENDS:
                probe = torch.empty(1, 1, DIM_HEAD, device="cuda", dtype=torch.bfloat16)
                reason = None if backend == "chunked" else unavailable_reason(backend, probe, probe, BUCKET)
                result = measure(lsh_step, reason, backend, length, n_hashes)
                rows.append([f"{length:,}", str(n_hashes), backend, *result])
        flops = 3.5 * 2 * HEADS * length * length * DIM_HEAD  # causal: half of 4 * L^2 * d
        result = measure(sdpa_step, None, length)
        rows.append([f"{length:,}", "-", "sdpa (flash, causal)", *result[:2], "-", tflops(flops, result)])
    return rows


def tflops(flops: float, result: list[str]) -> str:
    """TFLOP/s of ``flops`` done in the ``ms`` of a :func:`measure` result."""
    return "-" if result[0][0].isalpha() else f"{flops / (float(result[0]) / 1e3) / 1e12:.1f}"


def measure(make_step, reason: str | None, *args) -> list[str]:
    """``[ms, MB, GB/s, TFLOP/s]`` of a step, or the reason it did not run."""
    if reason is not None:
        return [f"n/a ({reason})", "-", "-", "-"]
    try:
        seconds, peak = timed(make_step(*args))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return ["out of memory", "-", "-", "-"]
    if make_step is not lsh_step:
        return [f"{seconds * 1e3:.1f}", f"{peak / 2**20:,.0f}", "-", "-"]
    flops, bytes_moved = lsh_work(*args[1:])
    rates = [f"{bytes_moved / seconds / 1e9:,.0f}", f"{flops / seconds / 1e12:.1f}"]
    return [f"{seconds * 1e3:.1f}", f"{peak / 2**20:,.0f}", *rates]


def model_rows(lengths: list[int]) -> list[list[str]]:
    """A whole ReformerLM training step (depth 6, dim 512, bf16 autocast, AdamW) per length."""
    rows = []
    for length in lengths:
        model = ReformerLM(num_tokens=256, dim=512, depth=6, heads=8, bucket_size=BUCKET, n_hashes=4,
                           causal=True, max_seq_len=length).cuda()  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, 256, (1, length + 1), device="cuda")

        def step(model=model, opt=opt, tokens=tokens):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
            F.cross_entropy(logits.float().view(-1, 256), tokens[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            seconds, peak = timed(step)
            rows.append([f"{length:,}", f"{seconds * 1e3:,.0f}", f"{peak / 2**20:,.0f}"])
        except torch.OutOfMemoryError:
            rows.append([f"{length:,}", "out of memory", "-"])
        del model, opt
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    parser.add_argument("--n-hashes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--model-lengths", type=int, nargs="+", default=[65536, 262144, 1048576])
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs" / "benchmarks-gpu.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device")
    lines = [
        "# GPU benchmarks",
        "",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}. `python benchmarks/gpu.py`.",
        "",
        "## LSH attention fwd+bwd (8 heads, head dim 64, bucket 64, bf16, strict causal)",
        "",
        *markdown_table(
            ["tokens", "n_hashes", "backend", "ms", "peak MB", "GB/s (model)", "TFLOP/s (model)"],
            attention_rows(args.lengths, args.n_hashes),
        ),
    ]
    if not args.skip_model:
        lines += [
            "",
            "## ReformerLM training step (depth 6, dim 512, n_hashes 4, bf16 autocast, AdamW)",
            "",
            *markdown_table(["tokens", "ms", "peak MB (max_memory_allocated)"], model_rows(args.model_lengths)),
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
