"""Training step (forward, cross-entropy, backward) of a whole language model: time, peak memory,
achieved fraction of the machine's GEMM rate, vs sequence length and depth.

Systems, all ``num_tokens=256, dim=512, heads=8, bucket_size=64, n_hashes=4, causal=True``,
batch 1, ``n_buckets = length // 64``, no dropout:

* ``ours``: ``reformer.ReformerLM`` (reversible, LSH);
* ``reformer_pytorch``: ``reformer_pytorch.ReformerLM`` 1.4.4, same keywords;
* ``transformers``: Hugging Face ``ReformerModelWithLMHead`` built offline from a
  ``ReformerConfig`` (every layer LSH, ``is_decoder=True``, GELU, learned positions);
* ``dense``: our model as a standard Transformer (pre-norm residuals, separate q/k/v, dense
  causal ``scaled_dot_product_attention``);
* ``ours-plain`` (optional): ``ours`` with ordinary autograd instead of reversible layers.

Sweep: ``--lengths`` at depth ``--length-depth`` (time and memory vs length), then
``--depths`` at each of ``--depth-lengths`` (memory vs depth). Each case runs in a fresh
spawned process. Its first step is the memory step: peak resident set above the resident set
after building the model (weight gradients, activations, temporaries), with glibc handing
large blocks straight back to the OS (``MALLOC_MMAP_THRESHOLD_``) so that it measures live
memory, not the allocator's high-water mark. It is also the warm-up. The allocator is then
switched to keeping freed memory (the caching CPU allocator), as ``reformer train`` runs (fresh
pages for every tensor would time the kernel's page faults), one more untimed step faults its
pages in, and the median of ``--repeats`` steps is the time (one step when
a step takes longer than ``FAST_STEP_S``); the memory number is read before them, so they
cannot inflate it.

Cases estimated (from the previous length or depth, scaled by the FLOP count) to take longer
than ``--max-step-seconds`` per step are skipped; the child process is capped at the memory
available when it starts, so that an oversized case fails as "out of memory" instead of
waking the kernel's OOM killer. Writes ``benchmarks.md``, ``benchmarks.json`` (raw results;
``--replot`` renders them again without measuring) and three PNG plots to ``--out-dir``.
Never asserts.

    python benchmarks/training.py                                   # the full sweep (~1 hour on 2 cores)
    python benchmarks/training.py --lengths 256 512 --depths 1 2 --depth-lengths 256 --out-dir /tmp/b
    python benchmarks/training.py --replot                          # tables and plots from docs/benchmarks.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    MEASURE_MEMORY_ENV,
    gemm_gflops,
    hf_reformer_lm,
    importable,
    keep_freed_memory,
    kept_memory_text,
    machine_line,
    markdown_table,
    peak_rss_bytes,
    rss_bytes,
    run_isolated,
    write_atomic,
)
from torch import nn

SYSTEMS = ("ours", "reformer_pytorch", "transformers", "dense", "ours-plain")
DEFAULT_SYSTEMS = SYSTEMS[:4]
NEEDS = {"reformer_pytorch": "reformer_pytorch", "transformers": "transformers"}
SIZE = dict(num_tokens=256, dim=512, heads=8, bucket_size=64, n_hashes=4)
FF_MULT = 4
LIBRARIES = ("reformer_pytorch", "transformers")
# A step slower than this is timed once (its noise is small next to its length; three would
# make the sweep too long).
FAST_STEP_S = 20.0
# Step time grows a little faster than the FLOP count (sorting, memory traffic): the skip
# rule's estimate is the FLOP ratio times this.
SLACK = 1.1
# Left to the rest of the machine when capping a case's memory.
HEADROOM_BYTES = 2 * 2**30


def step_flops(
    length: int,
    depth: int,
    *,
    dense: bool,
    num_tokens: int = 256,
    dim: int = 512,
    bucket_size: int = 64,
    n_hashes: int = 4,
    ff_mult: int = FF_MULT,
) -> float:
    """Floating-point operations (2 per multiply-add) one training step of batch 1 must do.

    Forward, per layer, for ``L = length``, ``d = dim`` (all heads together):

    * projections ``2 L d^2 p``: ``p = 3`` for LSH (shared query-key, value, output), 4 for
      dense (query, key, value, output);
    * feed-forward ``2 * 2 L d (ff_mult d)``;
    * LSH attention: per round ``L / bucket_size`` chunks, each a ``(b x d_head) @ (d_head x 2b)``
      score and a ``(b x 2b) @ (2b x d_head)`` value matmul per head (look one chunk back), so
      ``n_hashes * (L / b) * 2 * 2 b (2 b) d = 8 n_hashes b L d``;
    * dense causal attention: half of ``2 * 2 L^2 d``, i.e. ``2 L^2 d``;

    plus the logits head ``2 L d num_tokens``. The backward pass does twice the forward's
    matmuls, so these count three times. LSH hashing (each head's keys times its random
    rotations, ``L d n_hashes n_buckets`` with ``n_buckets = L / b``: quadratic in L too) has
    no gradient and counts once. Not counted: the reversible layers' recomputation (work the
    method adds, not work the step needs), softmax, norms, sorting, embeddings.
    """
    n = length
    if dense:
        per_layer = 2 * n * dim**2 * 4 + 2 * n**2 * dim
        hashing = 0
    else:
        per_layer = 2 * n * dim**2 * 3 + 8 * n_hashes * bucket_size * n * dim
        hashing = depth * n * dim * n_hashes * max(2, n // bucket_size)
    per_layer += 4 * n * dim * ff_mult * dim
    return 3 * (depth * per_layer + 2 * n * dim * num_tokens) + hashing


def system_flops(system: str, length: int, depth: int) -> float:
    size = {k: SIZE[k] for k in ("num_tokens", "dim", "bucket_size", "n_hashes")}
    return step_flops(length, depth, dense=system == "dense", **size)


# --- the measuring process ------------------------------------------------------------------


Loss = Callable[[torch.Tensor], torch.Tensor]


def build(system: str, length: int, depth: int) -> tuple[nn.Module, Loss]:
    """The model (training mode) and its ``tokens (1, L) -> loss`` function: our models'
    chunked cross-entropy (``model(x, targets=y)``, the whole logits never held), the peers'
    cross-entropy on their full logits ``(1, L, 256)``."""
    kw = dict(SIZE, depth=depth, max_seq_len=length, causal=True)
    if system == "reformer_pytorch":
        from reformer_pytorch import ReformerLM as PeerLM

        model = PeerLM(**kw)
        return model, _full_logits_loss(model)
    if system == "transformers":
        model, logits_of = _transformers_lm(length, depth)
        return model, _full_logits_loss(logits_of)
    from reformer import ReformerLM

    if system == "dense":
        model = ReformerLM(**kw, residual="standard", shared_qk=False, use_full_attn=True)
    else:
        model = ReformerLM(**kw, reverse_thres=10**9 if system == "ours-plain" else 0)
    return model, lambda tokens: model(tokens, targets=tokens)


def _full_logits_loss(logits_of: Callable[[torch.Tensor], torch.Tensor]) -> Loss:
    def loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = logits_of(tokens)  # (1, L, num_tokens)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), tokens.view(-1))

    return loss


def _transformers_lm(length: int, depth: int) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """Hugging Face's causal Reformer of the same size, from a config (no download). Learned
    positions: their axial ones must factor the training length exactly."""
    from reformer.hashing import buckets_for_length

    size = {k: v for k, v in SIZE.items() if k != "num_tokens"}
    model = hf_reformer_lm(
        **size,
        depth=depth,
        num_buckets=buckets_for_length(length, SIZE["bucket_size"]),
        vocab_size=SIZE["num_tokens"],
        feed_forward_size=FF_MULT * SIZE["dim"],
        hidden_act="gelu",
        axial_pos_embds=False,
        max_position_embeddings=length,
    )
    return model, lambda tokens: model(tokens).logits


def measure(system: str, length: int, depth: int, threads: int, repeats: int, memory_limit: int) -> dict:
    """One case, in a fresh process: the memory step, then the timed steps (see the module doc)."""
    resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_of = build(system, length, depth)
    tokens = torch.randint(0, SIZE["num_tokens"], (1, length))

    def step() -> float:
        start = time.perf_counter()
        loss_of(tokens).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    before = rss_bytes()
    first_s = step()
    mb = max(peak_rss_bytes() - before, 0) / 2**20
    kept = keep_freed_memory()
    step()  # the first step with freed memory kept faults its pages in
    times = [step() for _ in range(repeats if first_s < FAST_STEP_S else 1)]
    return {"s": statistics.median(times), "steps": len(times), "first_s": first_s, "mb": mb, "kept": kept}


# --- the sweep ------------------------------------------------------------------------------


def cases(lengths: list[int], length_depth: int, depths: list[int], depth_lengths: list[int]) -> list[tuple[int, int]]:
    """``(length, depth)`` in run order: the length sweep, then each depth sweep, no repeats.
    Ascending, so that every case after the first has a smaller neighbour to extrapolate from."""
    order = [(n, length_depth) for n in sorted(lengths)]
    order += [(n, d) for n in sorted(depth_lengths) for d in sorted(depths)]
    return list(dict.fromkeys(order))


def _neighbour(done: dict, system: str, length: int, depth: int) -> tuple[int, int] | None:
    """The done case to extrapolate from: the longest shorter one of the same depth, else the
    deepest shallower one of the same length."""
    shorter = [n for (s, n, d) in done if s == system and d == depth and n < length]
    if shorter:
        return max(shorter), depth
    shallower = [d for (s, n, d) in done if s == system and n == length and d < depth]
    return (length, max(shallower)) if shallower else None


def skip_reason(done: dict, system: str, length: int, depth: int, max_step_seconds: float) -> dict | None:
    """A skip record when the case would fail or exceed ``max_step_seconds``, else None.
    Carries ``est_s`` so that later cases can extrapolate from an estimate."""
    key = _neighbour(done, system, length, depth)
    if key is None:
        return None
    base = done[(system, *key)]
    if "error" in base:
        return {"skip": f"skipped ({base['error']} at {key[0]:,} x {key[1]})"}
    base_s = base.get("s", base.get("est_s"))
    if base_s is None:  # skipped for a failure further back: so is this one
        return {"skip": base["skip"]}
    est = base_s * SLACK * system_flops(system, length, depth) / system_flops(system, *key)
    return {"skip": f"skipped (est. {est:.0f} s)", "est_s": est} if est > max_step_seconds else None


def available_bytes() -> int:
    """Memory the kernel says could be allocated now (``MemAvailable``)."""
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def runnable_systems(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """The systems that can run here, and why the others cannot."""
    missing = [s for s in requested if s in NEEDS and not importable(NEEDS[s])]
    not_run = {s: f"not installed (`pip install {NEEDS[s]}`)" for s in missing}
    return [s for s in requested if s not in not_run], not_run


def run_sweep(args: argparse.Namespace, command: str, json_path: Path) -> dict:
    """Measure every case; the raw results are saved after each one, so a stopped run can
    still be rendered with ``--replot``."""
    # Large blocks straight from and back to the OS in the children (glibc reads this at start-up).
    for key, value in MEASURE_MEMORY_ENV.items():
        os.environ.setdefault(key, value)
    systems, not_run = runnable_systems(args.systems)
    gflops_before = gemm_gflops(args.threads)
    report = {
        "command": command,
        "threads": args.threads,
        "repeats": args.repeats,
        "max_step_seconds": args.max_step_seconds,
        "length_depth": args.length_depth,
        "lengths": sorted(args.lengths),
        "depths": sorted(args.depths),
        "depth_lengths": sorted(args.depth_lengths),
        "systems": systems,
        "not_run": not_run,
        "gemm_gflops": [gflops_before],
        "machine": machine_line(args.threads, gflops_before, LIBRARIES),
        "cases": [],
    }
    done: dict[tuple[str, int, int], dict] = {}
    for system in systems:
        for length, depth in cases(args.lengths, args.length_depth, args.depths, args.depth_lengths):
            res = skip_reason(done, system, length, depth, args.max_step_seconds)
            if res is None:
                limit = max(available_bytes() - HEADROOM_BYTES, 2**30)
                res = run_isolated(measure, system, length, depth, args.threads, args.repeats, limit)
            done[system, length, depth] = res
            report["cases"].append({"system": system, "length": length, "depth": depth, **res})
            print(f"{system:>16} {length:>6} x {depth:>2}: {time_cell(res)}, {memory_cell(res)}", file=sys.stderr)
            write_atomic(json_path, json.dumps(report, indent=1))
    report["gemm_gflops"].append(gemm_gflops(args.threads))
    report["machine"] = machine_line(args.threads, max(report["gemm_gflops"]), LIBRARIES)
    return report


# --- tables ---------------------------------------------------------------------------------


def time_cell(res: dict) -> str:
    if "s" in res:
        return f"{res['s']:.2f} s" if res["s"] < 10 else f"{res['s']:.1f} s"
    return res.get("skip") or res.get("error", "?")


def memory_cell(res: dict) -> str:
    return f"{res['mb']:,.0f} MB" if "mb" in res else res.get("skip") or res.get("error", "?")


def ratio_cell(other: dict, ours: dict, key: str) -> str:
    return f"{other[key] / ours[key]:.2f}x" if key in other and key in ours else "-"


class _Cases(dict):
    """Results by ``(system, length, depth)``; the cases a stopped sweep never reached read "not run"."""

    def __missing__(self, key: tuple[str, int, int]) -> dict:
        return {"skip": "not run"}


def _results(report: dict) -> _Cases:
    return _Cases({(c["system"], c["length"], c["depth"]): c for c in report["cases"]})


def efficiency_cell(res: dict, system: str, length: int, depth: int, gemm: float) -> str:
    """Achieved GFLOP/s (``step_flops`` / time) and its fraction of the measured GEMM rate."""
    if "s" not in res:
        return "-"
    rate = system_flops(system, length, depth) / res["s"] / 1e9
    return f"{rate:.0f} GFLOP/s ({100 * rate / gemm:.0f}%)"


def length_tables(report: dict) -> list[str]:
    """Time, memory and GEMM-fraction tables vs length at the length-sweep depth."""
    res, systems, depth = _results(report), report["systems"], report["length_depth"]
    gemm = max(report["gemm_gflops"])
    peers = [s for s in systems if s != "ours"] if "ours" in systems else []
    out = []
    for title, cell, key in (("Time per step", time_cell, "s"), ("Peak memory", memory_cell, "mb")):
        head = ["length", *systems, *(f"{s} / ours" for s in peers)]
        rows = []
        for n in report["lengths"]:
            row = [f"{n:,}", *(cell(res[s, n, depth]) for s in systems)]
            rows.append(row + [ratio_cell(res[s, n, depth], res["ours", n, depth], key) for s in peers])
        out += [f"### {title} vs length (depth {depth})", "", *markdown_table(head, rows), ""]
    head = ["length", *systems]
    rows = [
        [f"{n:,}", *(efficiency_cell(res[s, n, depth], s, n, depth, gemm) for s in systems)] for n in report["lengths"]
    ]
    out += [f"### Achieved rate and fraction of the GEMM rate ({gemm:.0f} GFLOP/s), depth {depth}", ""]
    return out + [*markdown_table(head, rows), ""]


def depth_table(report: dict) -> list[str]:
    """Peak memory (and time) vs depth, with the peers' memory relative to ours."""
    res, systems = _results(report), report["systems"]
    peers = [s for s in systems if s != "ours"] if "ours" in systems else []
    head = ["length", "depth", *systems, *(f"{s} / ours (memory)" for s in peers)]
    rows = []
    for n in report["depth_lengths"]:
        for d in report["depths"]:
            cells = [_memory_time(res[s, n, d]) for s in systems]
            rows.append([f"{n:,}", str(d), *cells, *(ratio_cell(res[s, n, d], res["ours", n, d], "mb") for s in peers)])
    return ["### Peak memory vs depth (time per step in brackets)", "", *markdown_table(head, rows), ""]


def _memory_time(res: dict) -> str:
    return f"{memory_cell(res)} ({time_cell(res)})" if "mb" in res else memory_cell(res)


def crossover(points: list[tuple[int, float, float]]) -> float | None:
    """Length at which ``a`` drops below ``b`` in ``(length, a, b)`` points (ascending),
    interpolated log-log between the two measured lengths around the change."""
    for (n1, a1, b1), (n2, a2, b2) in pairwise(points):
        if a1 >= b1 and a2 < b2:
            r1, r2 = math.log(a1 / b1), math.log(a2 / b2)
            return math.exp(math.log(n1) + (math.log(n2) - math.log(n1)) * r1 / (r1 - r2))
    return None


def crossover_text(report: dict, key: str, what: str) -> str:
    """Where ours (LSH) overtakes dense attention in ``key`` (``s`` or ``mb``), in words."""
    res, depth = _results(report), report["length_depth"]
    if not {"ours", "dense"} <= set(report["systems"]):
        return f"Crossover ({what}): not measured (needs both `ours` and `dense`)."
    pairs = [(n, res["ours", n, depth], res["dense", n, depth]) for n in report["lengths"]]
    both = [(n, a[key], b[key]) for n, a, b in pairs if key in a and key in b]
    if not both:
        return f"Crossover ({what}): no length where both ran."
    if both[0][1] < both[0][2]:
        return f"Crossover ({what}): LSH is already below dense at the shortest length, {both[0][0]:,}."
    at = crossover(both)
    if at is not None:
        return f"Crossover ({what}): LSH drops below dense at about {at:,.0f} tokens (log-log interpolation)."
    beyond = [(n, b) for n, a, b in pairs if n > both[-1][0] and key in a and key not in b]
    tail = f"; dense at {beyond[0][0]:,}: {time_cell(beyond[0][1])}" if beyond else ""
    return f"Crossover ({what}): dense is still below LSH at {both[-1][0]:,}, the longest length both ran{tail}."


def render(report: dict) -> str:
    """``benchmarks.md``: the setup, the tables, the crossover and what was not measured."""
    notes = [f"* `{s}`: {why}." for s, why in report["not_run"].items()]
    skipped = sum("skip" in c for c in report["cases"])
    gemm = ", ".join(f"{g:.0f}" for g in report["gemm_gflops"])
    lines = [
        "# Training step: time and memory vs length and depth (CPU)",
        "",
        "Written by `benchmarks/training.py` (see its docstring for the method). Every system: "
        "`num_tokens=256, dim=512, heads=8, bucket_size=64, n_hashes=4, causal=True`, `n_buckets = length // 64`, "
        "batch 1, one step = forward, cross-entropy, backward. `ours`: `reformer.ReformerLM` (reversible, LSH); "
        "`reformer_pytorch` 1.4.4 `ReformerLM`; `transformers`: `ReformerModelWithLMHead` (every layer LSH, "
        '`is_decoder=True`); `dense`: our model as a standard Transformer (`residual="standard", shared_qk=False, '
        "use_full_attn=True`: dense causal `scaled_dot_product_attention`); `ours-plain`: ours without reversible "
        "layers. Options not listed keep each library's default (e.g. `reformer_pytorch` splits its feed-forward "
        "into `ff_chunks=100` pieces along the sequence, ours into 1).",
        "",
        f"Time: median of {report['repeats']} steps (one step when a step takes over {FAST_STEP_S:.0f} s) after "
        f"the memory step and an untimed step, with {kept_memory_text(report['cases'])}. Memory: peak resident set of "
        "the memory step above the built model (weight gradients, activations, temporaries), large blocks "
        "returned to the OS (`MALLOC_MMAP_THRESHOLD_=65536`). "
        f"Cases estimated to take over {report['max_step_seconds']:.0f} s per step are skipped (estimate: the "
        "previous length or depth scaled by the FLOP count). GEMM fraction: `step_flops()` (matmul FLOPs the step "
        "must do, backward = 2x forward, reversible recomputation not counted) / time, over the fp32 GEMM rate "
        f"measured before and after the sweep ({gemm} GFLOP/s; the higher is used).",
        "",
        report["machine"],
        "",
        f"Command: `{report['command']}`",
        "",
        *length_tables(report),
        crossover_text(report, "s", "time"),
        "",
        crossover_text(report, "mb", "memory"),
        "",
        *depth_table(report),
        "![time per step vs length](benchmarks-time-vs-length.png)",
        "![peak memory vs length](benchmarks-memory-vs-length.png)",
        "![peak memory vs depth](benchmarks-memory-vs-depth.png)",
        "",
        f"Skipped cases: {skipped}." if skipped else "No case was skipped.",
    ]
    if notes:
        lines += ["", "Not measured:", *notes]
    return "\n".join(lines) + "\n"


# --- plots ----------------------------------------------------------------------------------


def _axes(title: str, xlabel: str, ylabel: str, log: bool):
    from reformer.plots import pyplot

    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    scale = "log" if log else "linear"
    ax.set(xscale=scale, yscale=scale, xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> None:
    from reformer.plots import save_png

    fig.axes[0].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def plot_vs_length(report: dict, key: str, ylabel: str, path: Path) -> None:
    """One log-log line per system at the length-sweep depth (measured points only)."""
    res, depth = _results(report), report["length_depth"]
    fig, ax = _axes(f"Training step, dim 512, depth {depth} (CPU)", "sequence length (tokens)", ylabel, True)
    for system in report["systems"]:
        points = [(n, res[system, n, depth][key]) for n in report["lengths"] if key in res[system, n, depth]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=system)
    _save(fig, path)


def plot_vs_depth(report: dict, path: Path) -> None:
    """Peak memory vs depth: one line per system and length (line style per length)."""
    res = _results(report)
    fig, ax = _axes("Training-step memory vs depth (CPU)", "depth (layers)", "peak memory (MB)", False)
    styles = ["-", "--", ":", "-."]
    for i, n in enumerate(report["depth_lengths"]):
        for j, system in enumerate(report["systems"]):
            points = [(d, res[system, n, d]["mb"]) for d in report["depths"] if "mb" in res[system, n, d]]
            if points:
                style = dict(color=f"C{j}", linestyle=styles[i % len(styles)], marker="o")
                ax.plot(*zip(*points, strict=True), label=f"{system}, {n:,} tokens", **style)
    ax.set_xticks(report["depths"])
    ax.set_ylim(bottom=0)  # linear from zero: a flat line is memory independent of depth
    _save(fig, path)


def write_report(report: dict, out_dir: Path) -> None:
    """``benchmarks.md`` and the three PNGs in ``out_dir``, each written atomically."""
    text = render(report)
    print(text)
    write_atomic(out_dir / "benchmarks.md", text)
    plot_vs_length(report, "s", "seconds per step", out_dir / "benchmarks-time-vs-length.png")
    plot_vs_length(report, "mb", "peak memory (MB)", out_dir / "benchmarks-memory-vs-length.png")
    plot_vs_depth(report, out_dir / "benchmarks-memory-vs-depth.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024 * 2**i for i in range(7)])
    p.add_argument("--length-depth", type=int, default=6, help="depth of the length sweep")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 6, 12])
    p.add_argument("--depth-lengths", type=int, nargs="+", default=[4096, 16384], help="lengths of the depth sweep")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(DEFAULT_SYSTEMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up (median is reported)")
    p.add_argument("--max-step-seconds", type=float, default=120.0, help="skip cases estimated to take longer")
    p.add_argument("--out-dir", type=Path, default=Path("docs"))
    p.add_argument("--replot", action="store_true", help="render OUT_DIR/benchmarks.json again, measure nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    json_path = args.out_dir / "benchmarks.json"
    if args.replot:
        report = json.loads(json_path.read_text())
    else:
        command = "python benchmarks/training.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        report = run_sweep(args, command.strip(), json_path)
        write_atomic(json_path, json.dumps(report, indent=1))
    write_report(report, args.out_dir)


if __name__ == "__main__":
    main()
