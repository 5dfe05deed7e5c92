"""``torch.compile`` against eager on CPU, in ONE process: the steps alternate (eager, compiled,
compiled, eager, ...), so the machine's drift hits both alike.

Cases (the sizes of ``benchmarks/ab.py``): a causal ``LSHSelfAttention`` layer forward and
backward, and a causal ``ReformerLM`` training step (loss, backward), each at the lengths asked
for; the compiled copy has the eager one's weights and the same rotations (the RNG is reseeded
before each step; ``fallback_random`` makes Inductor draw eager's numbers), so the first
step's outputs are compared too. The compile time is the compiled copy's first step, less an
eager step. Decoding (ms per new token after prompts of each length) is eager only: the
decode step does not compile yet (docs/python.md).

    python benchmarks/compile.py --out docs/compile-cpu.md
    python benchmarks/compile.py --cases attention-16k --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import CASES, TRAINING, alternate, build, timed  # noqa: E402
from common import keep_freed_memory, machine_line, markdown_table, print_and_write  # noqa: E402

import reformer  # noqa: E402


def run_case(name: str, rounds: int) -> dict:
    kind, length = CASES[name]
    _, eager_step = build(reformer, kind, length)
    _, compiled_step = build(reformer, kind, length, compiled=True)  # the same weights (seed 0)
    _, eager_out = timed(eager_step, 0)  # warm-up, and the outputs to compare
    first_s, compiled_out = timed(compiled_step, 0)  # the compile and one step
    times = alternate(eager_step, compiled_step, rounds)
    return {
        "case": name,
        "compile_s": first_s - times["b_ms"] / 1000,
        "eager_ms": times.pop("a_ms"),
        "compiled_ms": times.pop("b_ms"),
        **times,
        "max_diff": (eager_out.float() - compiled_out.float()).abs().max().item(),
    }


def decode_ms_per_token(prompt_len: int, new_tokens: int) -> float:
    """Eager cached decoding: ms per new token after a prompt of ``prompt_len`` tokens."""
    torch.manual_seed(0)
    model = reformer.ReformerLM(**TRAINING, max_seq_len=max(8192, 2 * prompt_len)).eval()
    prompt = torch.randint(0, TRAINING["num_tokens"], (1, prompt_len), generator=torch.Generator().manual_seed(1))
    model.generate(prompt, 2, temperature=0)  # warm-up (prefill and kernels)
    stream = reformer.generate.stream(model, prompt, new_tokens + 1, temperature=0)
    next(stream)  # the prefill and the first token
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    return 1000 * (time.perf_counter() - start) / count


def render(results: list[dict], decode: dict[int, float], rounds: int, threads: int) -> list[str]:
    rows = [[r["case"], f"{r['compile_s']:.0f}", f"{r['eager_ms']:.0f}", f"{r['compiled_ms']:.0f}",
             f"{r['ratio']:.2f}", f"{r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}", f"{r['max_diff']:.1e}"]
            for r in results]  # fmt: skip
    decode_rows = [[f"{n:,}", f"{ms:.1f}", "not compiled (the decode step does not compile yet)"]
                   for n, ms in decode.items()]  # fmt: skip
    return [
        f"Eager as A, `torch.compile` (Inductor, default options) as B; {rounds} rounds A B B A in one "
        f"process, median of each; ratio = B / A per round (median, range; below 1: compiled faster). "
        f"{machine_line(threads)}",
        "",
        *markdown_table(
            ["case", "compile s", "eager ms", "compiled ms", "B / A", "range", "max abs diff (first step)"], rows
        ),  # fmt: skip
        "",
        *markdown_table(["prompt tokens", "eager ms / new token", "compiled"], decode_rows),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES),
                        default=["attention-16k", "training-4k", "training-16k"])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant and case")
    parser.add_argument("--decode-prompts", type=int, nargs="*", default=[16, 4096])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="also write the Markdown tables here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    results = []
    with torch._inductor.config.patch(fallback_random=True):  # eager's random numbers: outputs comparable
        for name in args.cases:
            results.append(run_case(name, args.rounds))
            print(f"{name}: compiled / eager {results[-1]['ratio']:.2f}", file=sys.stderr)
    decode = {n: decode_ms_per_token(n, 32) for n in args.decode_prompts}
    print_and_write(render(results, decode, args.rounds, args.threads), "compile.py", sys.argv[1:], args.out)


if __name__ == "__main__":
    main()
