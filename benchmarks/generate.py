"""Generation speed: milliseconds per new token and peak memory vs prompt length.

A causal byte-level LM of the same size for every system - ``dim=512, depth=6, heads=8``
(dim_head 64), ``bucket_size=64, n_hashes=4``, every layer LSH, room for 32K positions -
greedy decoding, batch 1:

* ``ours (cached)``: ``ReformerLM.generate`` (prefill, then per-layer cache);
* ``ours (recompute)``: the same with ``use_cache=False`` (full forward per token);
* ``reformer_pytorch`` 1.4.4: ``TrainingWrapper.generate`` (full forward per token);
* ``transformers``: ``ReformerModelWithLMHead.generate(use_cache=True)``.

Per-token time is the median time between successive new tokens (after the first, whose
wait - the prompt's prefill - is reported separately), taken from each system's streaming
hook. Each case runs in a fresh process, after a short warm-up; memory is the peak
resident set above the process's before the measured call (the allocator's high-water
mark: what the process had to hold). Cases estimated to take longer
than ``--max-seconds`` are skipped. Writes a Markdown table and a log-log PNG plot. Never
asserts.

    python benchmarks/generate.py
    python benchmarks/generate.py --lengths 16 1024 --systems ours-cached reformer_pytorch
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import hf_reformer_lm, importable, machine_line, markdown_table, peak_rss_bytes, rss_bytes, run_isolated

SYSTEMS = ("ours-cached", "ours-recompute", "reformer_pytorch", "transformers")
NEEDS = {"reformer_pytorch": "reformer_pytorch", "transformers": "transformers"}
MAX_POSITIONS = 32768
SIZE = dict(dim=512, depth=6, heads=8, bucket_size=64, n_hashes=4)


def _stepper(system: str):
    """A ``run(prompt, n_new)`` for ``system`` that returns the time at which each new token
    became available (model built here, eval mode)."""
    torch.manual_seed(0)
    common = dict(num_tokens=256, max_seq_len=MAX_POSITIONS, causal=True, **SIZE)
    if system.startswith("ours"):
        from reformer import ReformerLM

        model = ReformerLM(**common).eval()
        use_cache = system == "ours-cached"
        return lambda prompt, n: [
            time.perf_counter() for _ in model.stream(prompt, n, temperature=0, use_cache=use_cache)
        ]
    if system == "reformer_pytorch":
        from reformer_pytorch import ReformerLM as PeerLM
        from reformer_pytorch.generative_tools import TrainingWrapper

        wrapper = TrainingWrapper(PeerLM(**common)).eval()

        def run_peer(prompt, n):  # no streaming: one call per token, each recomputing the context
            times, out = [], prompt
            for _ in range(n):  # keeps int((1 - filter_thres) * 256) = 1 token: greedy
                out = torch.cat([out, wrapper.generate(out, 1, temperature=1.0, filter_thres=1 - 1.5 / 256)], dim=1)
                times.append(time.perf_counter())
            return times

        return run_peer
    model = hf_reformer_lm(
        **SIZE,
        num_buckets=MAX_POSITIONS // SIZE["bucket_size"],
        axial_pos_shape=(128, 256),
        axial_pos_embds_dim=(64, 448),
        max_position_embeddings=MAX_POSITIONS,
        hash_seed=0,
    ).eval()

    class Clock:  # a transformers streamer: put() gets the prompt first, then each new token
        def __init__(self):
            self.times = []

        def put(self, _tokens):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run_hf(prompt, n):
        clock = Clock()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, streamer=clock)
        return clock.times[1:]

    return run_hf


def measure(system: str, length: int, n_new: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    run = _stepper(system)
    prompt = torch.randint(1, 256, (1, length))
    with torch.no_grad():
        run(prompt[:, :16], 2)  # warm-up: first-call costs of every code path
        before = rss_bytes()
        start = time.perf_counter()
        times = run(prompt, 1 + n_new)
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "ms": sorted(steps)[len(steps) // 2] * 1e3,  # median time between tokens
        "first_s": times[0] - start,
        "mb": max(peak_rss_bytes() - before, 0) / 2**20,
        "n": n_new,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 1024, 4096, 16384])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--new-tokens", type=int, default=16, help="tokens timed per case (recompute systems: fewer)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=300.0, help="skip cases estimated to take longer")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks-generate-cpu.md"))
    args = p.parse_args(argv)
    systems = [s for s in args.systems if s not in NEEDS or importable(NEEDS[s])]

    results: dict[tuple[str, int], dict] = {}
    for system in systems:
        last = None
        for length in sorted(args.lengths):
            recompute = system in ("ours-recompute", "reformer_pytorch")
            n_new = max(1, args.new_tokens // 8) if recompute and length >= 1024 else args.new_tokens
            if last is not None:  # per-token and prefill cost grow at most linearly with the prompt
                scale = length / last["length"]
                estimate = last["first_s"] * scale * 2 + last["ms"] / 1e3 * (scale if recompute else 1) * n_new
                if estimate > args.max_seconds:
                    results[system, length] = {"skip": f"skipped (est. {estimate:.0f} s)"}
                    continue
            res = run_isolated(measure, system, length, n_new, args.threads)
            results[system, length] = res
            if "ms" in res:
                last = {**res, "length": length}
            print(f"{system:>16} {length:>6}: {_cell(res)}", file=sys.stderr, flush=True)

    head = ["prompt", *systems]
    ratio_peers = [s for s in ("ours-recompute", "reformer_pytorch", "transformers") if s in systems]
    if "ours-cached" in systems:
        head += [f"{s} / cached" for s in ratio_peers]
    rows = []
    for length in sorted(args.lengths):
        row = [f"{length:,}", *(_cell(results[s, length]) for s in systems)]
        if "ours-cached" in systems:
            ours = results["ours-cached", length]
            for s in ratio_peers:
                other = results[s, length]
                row.append(f"{other['ms'] / ours['ms']:.1f}x" if "ms" in other and "ms" in ours else "-")
        rows.append(row)
    cached = [results.get(("ours-cached", n), {}) for n in sorted(args.lengths)]
    growth = ""
    if len(cached) > 1 and all("ms" in c for c in cached):
        growth = f"Cached ms/token at the longest prompt / at the shortest: {cached[-1]['ms'] / cached[0]['ms']:.2f}x."
    lines = [
        "# Generation speed (CPU)",
        "",
        "Causal byte-level LM, `dim=512, depth=6, heads=8, bucket_size=64, n_hashes=4`, every layer LSH, "
        f"{MAX_POSITIONS:,} positions, greedy, batch 1. Cells: milliseconds per new token (median gap between "
        "successive new tokens) / time to the first token (prefill) / peak memory above the model. "
        "`ours-cached` is `ReformerLM.generate()` (prefill, then per-layer decoding cache), `ours-recompute` "
        "the same with `use_cache=False`; `reformer_pytorch` 1.4.4 `TrainingWrapper.generate`; `transformers` "
        "`ReformerModelWithLMHead.generate(use_cache=True)`.",
        "",
        machine_line(args.threads),
        "",
        *markdown_table(head, rows),
        "",
        growth,
        "",
        "![ms per token vs prompt length](benchmarks-generate-cpu.png)",
        "",
        "Command: `python benchmarks/generate.py " + " ".join(sys.argv[1:]) + "`",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    _plot(results, systems, sorted(args.lengths), args.out.with_suffix(".png"))


def _cell(res: dict) -> str:
    if "ms" in res:
        return f"{res['ms']:,.1f} ms / {res['first_s']:.1f} s / {res['mb']:,.0f} MB"
    return res.get("skip") or res.get("error", "?")


def _plot(results: dict, systems: list[str], lengths: list[int], path: Path) -> None:
    from reformer.plots import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(6, 4))
    for system in systems:
        points = [(n, results[system, n]["ms"]) for n in lengths if "ms" in results[system, n]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=system)
    ax.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="ms per new token")
    ax.set_title("Generation, dim 512, depth 6, LSH (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_png(fig, path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
