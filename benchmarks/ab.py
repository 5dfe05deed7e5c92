"""A/B: this checkout's ``reformer`` against the package of another commit, in ONE process.

A refactor should change neither results nor speed. Timing the two versions in separate runs
mixes the change with the machine's drift (other jobs, frequency, page cache); here both are
imported side by side (the other commit's package as ``reformer_base``, from ``git archive``
into a temporary directory) and their steps alternate, A B B A, so drift hits both alike.

For every case: the same seed gives both versions the same weights (the base model's state
dict is loaded into ours where the names match, else each is built from the same seed) and the
same rotations (the global RNG is reseeded before each step), so the outputs are compared too:
``max |diff|`` of the loss (training) or of the output (attention) on the first step.

    python benchmarks/ab.py --base HEAD~3             # attention and training cases
    python benchmarks/ab.py --base main --cases attention-16k --rounds 9 --out docs/x.md
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import keep_freed_memory, machine_line, markdown_table, print_and_write  # noqa: E402

import reformer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE_NAME = "reformer_base"

#: name -> (kind, sequence length). Attention: one causal LSHSelfAttention layer, fwd+bwd.
#: Training: a causal ReformerLM step (loss, backward), the size of benchmarks/training.py.
CASES = {
    "attention-4k": ("attention", 4096),
    "attention-16k": ("attention", 16384),
    "training-4k": ("training", 4096),
    "training-16k": ("training", 16384),
}
ATTENTION = dict(dim=256, heads=4, bucket_size=64, n_hashes=4, causal=True)
TRAINING = dict(num_tokens=256, dim=256, depth=2, heads=4, bucket_size=64, n_hashes=4, causal=True)


def import_base(rev: str, into: Path) -> ModuleType:
    """The ``reformer`` package of commit ``rev``, imported as ``reformer_base`` (its modules
    import each other relatively, so they resolve inside it)."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, "reformer"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    init = into / "reformer" / "__init__.py"
    spec = importlib.util.spec_from_file_location(BASE_NAME, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASE_NAME] = module
    spec.loader.exec_module(module)
    return module


def share_weights(base: torch.nn.Module, ours: torch.nn.Module) -> bool:
    """Ours takes the base model's weights when every name and shape matches."""
    theirs, mine = base.state_dict(), ours.state_dict()
    if theirs.keys() != mine.keys() or any(theirs[k].shape != mine[k].shape for k in mine):
        return False
    ours.load_state_dict(theirs)
    return True


def build(
    package: ModuleType, kind: str, length: int, compiled: bool = False
) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """The module (built from seed 0) and its step (forward to a scalar, backward); the step
    returns the output. ``compiled``: the step runs the module through ``torch.compile``."""
    torch.manual_seed(0)
    if kind == "attention":
        module = package.LSHSelfAttention(**ATTENTION)
        x = torch.randn(1, length, ATTENTION["dim"], generator=torch.Generator().manual_seed(1), requires_grad=True)
        inputs, kwargs = (x,), {}
    else:
        module = package.ReformerLM(**TRAINING, max_seq_len=length)
        tokens = torch.randint(0, TRAINING["num_tokens"], (1, length), generator=torch.Generator().manual_seed(1))
        inputs, kwargs = (tokens,), {"targets": tokens}
    net = torch.compile(module) if compiled else module

    def step() -> torch.Tensor:
        out = net(*inputs, **kwargs)  # attention (1, L, dim); training: the loss
        out.sum().backward()
        for t in inputs:
            t.grad = None
        module.zero_grad(set_to_none=True)
        return out.detach()

    return module, step


def timed(step: Callable[[], torch.Tensor], seed: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(seed)  # the same rotations for both versions
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, out


def alternate(step_a: Callable[[], torch.Tensor], step_b: Callable[[], torch.Tensor], rounds: int) -> dict:
    """``rounds`` timed steps of each, A B B A ... (drift during a round hits both alike), each
    from the same seed: their medians (ms) and the ratio B / A per round (median, range)."""
    return alternate_seconds(lambda r: timed(step_a, r + 1)[0], lambda r: timed(step_b, r + 1)[0], rounds)


def alternate_seconds(seconds_a: Callable[[int], float], seconds_b: Callable[[int], float], rounds: int) -> dict:
    """:func:`alternate` of two measurements, each giving the seconds of round ``r``."""
    a, b = [], []
    for r in range(rounds):
        order = [(seconds_a, a), (seconds_b, b)] if r % 2 == 0 else [(seconds_b, b), (seconds_a, a)]
        for measure, times in order:
            times.append(measure(r))
    ratios = sorted(y / x for x, y in zip(a, b, strict=True))
    return {
        "a_ms": 1000 * statistics.median(a),
        "b_ms": 1000 * statistics.median(b),
        "ratio": statistics.median(ratios),
        "ratio_lo": ratios[0],
        "ratio_hi": ratios[-1],
    }


def run_case(base: ModuleType, name: str, rounds: int) -> dict:
    kind, length = CASES[name]
    base_module, base_step = build(base, kind, length)
    our_module, our_step = build(reformer, kind, length)
    shared = share_weights(base_module, our_module)
    _, base_out = timed(base_step, 0)  # warm-up, and the outputs to compare
    _, our_out = timed(our_step, 0)
    diff = (base_out.float() - our_out.float()).abs().max().item()
    times = alternate(base_step, our_step, rounds)
    return {
        "case": name,
        "base_ms": times.pop("a_ms"),
        "ours_ms": times.pop("b_ms"),
        **times,
        "same_weights": shared,
        "max_diff": diff,
    }


def render(rev: str, commit: str, results: list[dict], rounds: int, threads: int) -> list[str]:
    rows = [
        [
            r["case"],
            f"{r['base_ms']:.0f}",
            f"{r['ours_ms']:.0f}",
            f"{r['ratio']:.3f}",
            f"{r['ratio_lo']:.3f}-{r['ratio_hi']:.3f}",
            f"{r['max_diff']:.1e}" if r["same_weights"] else "n/a (weights differ)",
        ]
        for r in results
    ]
    return [
        f"Base `{rev}` ({commit[:10]}) as A, this checkout as B; {rounds} rounds A B B A in one process, "
        f"median of each, ratio = B / A per round (median, range). {machine_line(threads)}",
        "",
        *markdown_table(["case", "A ms", "B ms", "B / A", "range", "max abs diff (first step)"], rows),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--base", required=True, help="commit (or branch, tag) to compare against")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per version and case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    git = ["git", "-C", str(REPO), "rev-parse", args.base]
    commit = subprocess.run(git, check=True, capture_output=True, text=True).stdout.strip()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    with tempfile.TemporaryDirectory(prefix="reformer-ab-") as tmp:
        base = import_base(commit, Path(tmp))
        results = []
        for name in args.cases:
            results.append(run_case(base, name, args.rounds))
            print(f"{name}: ratio {results[-1]['ratio']:.3f}", file=sys.stderr)
    print_and_write(render(args.base, commit, results, args.rounds, args.threads), "ab.py", sys.argv[1:], args.out)


if __name__ == "__main__":
    main()
