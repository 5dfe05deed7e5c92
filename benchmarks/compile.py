"""``torch.compile`` against eager on CPU, in ONE process: the steps alternate (eager, compiled,
compiled, eager, ...), so the machine's drift hits both alike.

Cases (the sizes of ``benchmarks/ab.py``): a causal ``LSHSelfAttention`` layer forward and
backward, and a causal ``ReformerLM`` training step (loss, backward), each at the lengths asked
for; the compiled copy has the eager one's weights and the same rotations (the RNG is reseeded
before each step; ``fallback_random`` makes Inductor draw eager's numbers), so the first
step's outputs are compared too. The compile time is the compiled copy's first step, less a
later one. Greedy decoding (ms per new token after prompts of each length) compares eager with
``generate(..., compile=True)`` the same way, and whether both chose the same tokens.

    python benchmarks/compile.py --out docs/compile-cpu.md
    python benchmarks/compile.py --cases attention-16k --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import CASES, TRAINING, alternate, alternate_seconds, build, timed  # noqa: E402
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


def decode_case(prompt_len: int, new_tokens: int, rounds: int) -> dict:
    """Greedy cached decoding, eager (A) against ``compile=True`` (B), after a prompt of
    ``prompt_len`` tokens: ms per new token (the prefill not counted), A B B A rounds; the
    compile time is B's first decode step less a later one."""
    torch.manual_seed(0)
    model = reformer.ReformerLM(**TRAINING, max_seq_len=max(8192, 2 * prompt_len)).eval()
    prompt = torch.randint(0, TRAINING["num_tokens"], (1, prompt_len), generator=torch.Generator().manual_seed(1))

    def per_token(compile: bool) -> tuple[list[float], torch.Tensor]:
        """Seconds of each decode step, and the tokens."""
        stream = reformer.generate.stream(model, prompt, new_tokens + 1, temperature=0, compile=compile)
        tokens, seconds = [next(stream)], []  # (the prefill and the first token)
        start = time.perf_counter()
        for token in stream:
            seconds.append(time.perf_counter() - start)
            tokens.append(token)
            start = time.perf_counter()
        return seconds, torch.stack(tokens, dim=1)

    eager_tokens = per_token(False)[1]  # warm-up
    first, compiled_tokens = per_token(True)  # the compile
    times = alternate_seconds(lambda r: statistics.median(per_token(False)[0]),
                              lambda r: statistics.median(per_token(True)[0]), rounds)  # fmt: skip
    compiled_ms = times.pop("b_ms")
    return {
        "prompt": prompt_len,
        "eager_ms": times.pop("a_ms"),
        "compiled_ms": compiled_ms,
        **times,
        "compile_s": first[0] - compiled_ms / 1000,
        "same_tokens": torch.equal(eager_tokens, compiled_tokens),
    }


def render(results: list[dict], decode: list[dict], new_tokens: int, rounds: int, threads: int) -> list[str]:
    rows = [[r["case"], f"{r['compile_s']:.0f}", f"{r['eager_ms']:.0f}", f"{r['compiled_ms']:.0f}",
             f"{r['ratio']:.2f}", f"{r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}", f"{r['max_diff']:.1e}"]
            for r in results]  # fmt: skip
    decode_rows = [[f"{d['prompt']:,}", f"{d['compile_s']:.0f}", f"{d['eager_ms']:.2f}", f"{d['compiled_ms']:.2f}",
                    f"{d['ratio']:.2f}", f"{d['ratio_lo']:.2f}-{d['ratio_hi']:.2f}",
                    "yes" if d["same_tokens"] else "NO"] for d in decode]  # fmt: skip
    return [
        f"Eager as A, `torch.compile` (Inductor, default options) as B; {rounds} rounds A B B A in one "
        f"process, median of each; ratio = B / A per round (median, range; below 1: compiled faster). "
        f"{machine_line(threads)}",
        "",
        *markdown_table(
            ["case", "compile s", "eager ms", "compiled ms", "B / A", "range", "max abs diff (first step)"], rows
        ),  # fmt: skip
        "",
        f"Greedy cached decoding at batch 1 (`generate(..., compile=True)` as B), {new_tokens} new tokens per "
        "round, ms per new token (median step of a round; the prefill not counted):",
        "",
        *markdown_table(
            ["prompt tokens", "compile s", "eager ms / token", "compiled ms / token", "B / A", "range", "same tokens"],
            decode_rows,
        ),  # fmt: skip
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES),
                        default=["attention-16k", "training-4k", "training-16k"])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant and case")
    parser.add_argument("--decode-prompts", type=int, nargs="*", default=[16, 4096])
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per round")
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
    decode = []
    for n in args.decode_prompts:
        decode.append(decode_case(n, args.new_tokens, args.rounds))
        print(f"decode after {n}: compiled / eager {decode[-1]['ratio']:.2f}", file=sys.stderr)
    lines = render(results, decode, args.new_tokens, args.rounds, args.threads)
    print_and_write(lines, "compile.py", sys.argv[1:], args.out)


if __name__ == "__main__":
    main()
