"""``reformer reproduce longctx``: does LSH attention learn from far context? (docs/long-context.md)

Byte-level models on the standard library's source (``pysrc``: files are documents), all with
the same width, depth, context and token budget: a dense Transformer, the reversible shared-QK
model with full attention, LSH with 1/2/4/8 rounds and local attention alone. Each is scored on
windows of the context's length that lie inside one validation document, by position in the
window, with standard errors clustered by document (windows of one file are not independent).

An output directory holds ``config.json`` (a directory is never reused for another study), one
ordinary training run directory per model (``train-<model>/``, resumed by rerunning the command)
with its final evaluation cached in ``train-<model>/longctx-eval.json``, and the results of every
model finished so far: ``longctx.json``, ``longctx.md``, ``longctx-curves.png`` and
``longctx-positions.png``. ``models`` lets a session train a few models at a time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ReformerConfig
from .data import Documents, PySrc, load_pysrc, pysrc_corpus
from .model import ReformerLM
from .reproduce import (
    Progress,
    _write_text,
    claim_out_dir,
    copy_results,
    parse_attention,
    train_setting,
    training_seconds,
)
from .switch import switch_attention
from .train import TrainConfig, TrainState

#: The models of the study (besides ``lsh-N``): separate-QK dense Transformer, the reversible
#: shared-QK model with dense attention, and local attention alone.
FIXED_MODELS = ("transformer", "full", "local")
ALL_MODELS = ("transformer", "full", "lsh-1", "lsh-2", "lsh-4", "lsh-8", "local")
#: A finished model's results, in its run directory.
RESULT_FILE = "longctx-eval.json"
#: The study's results in its output directory (what ``--publish`` copies).
PUBLISHED = ("longctx.json", "longctx.md", "longctx-curves.png", "longctx-positions.png")
#: Position buckets at context 16,384 (``--long``).
LONG_POSITION_EDGES = (256, 1024, 2048, 4096, 8192)


def check_model_label(label: str) -> None:
    if label not in FIXED_MODELS:
        try:
            parse_attention(label)
        except ValueError:
            raise ValueError(f"model must be one of {list(FIXED_MODELS)} or 'lsh-N', got {label!r}") from None


@dataclass
class LongCtxConfig:
    """The study's settings; defaults are the CPU scale (see :data:`LONGCTX_SCALES`)."""

    seq_len: int = 4096
    """Context: tokens per training and evaluation window (the models' max_seq_len)."""
    steps: int = 2000
    """Training steps per model (the same for all: the same token budget). 2,000 by the rule
    set before the pilot (LSH-4 measured 1.15 s per step there, above 1 s)."""
    batch_size: int = 2
    """Windows per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW, linear warm-up, cosine decay)."""
    warmup_steps: int = 200
    """Warm-up steps."""
    eval_every: int = 250
    """Steps between points of the curves (and checkpoints: resume points)."""
    eval_batches: int = 4
    """Random validation windows (batches of ``batch_size``) per curve point."""
    eval_windows: int = 256
    """Final evaluation: at most this many windows inside validation documents."""
    dim: int = 128
    """Model width."""
    depth: int = 4
    """Layers."""
    heads: int = 4
    """Attention heads."""
    bucket_size: int = 64
    """LSH chunk length."""
    local_window: int = 256
    """Local model: blocks of this many tokens, each query seeing its block and the one before
    (``local_window`` to ``2 * local_window - 1`` tokens back in one layer; through ``depth``
    layers, ``depth * local_window`` to ``(depth + 1) * local_window - 1``)."""
    position_edges: tuple[int, ...] = (256, 1024, 2048)
    """Bounds of the position buckets (``0-256, 256-1K, 1K-2K, 2K-seq_len``)."""
    eval_rounds: tuple[int, ...] = (8, 16)
    """Trained LSH models are also evaluated with these many rounds and with full attention."""
    models: tuple[str, ...] = ALL_MODELS
    """The models of the study (a run may train a subset, see :func:`run_longctx`)."""
    seed: int = 0
    """Seeds the models and the training windows (curve windows: ``seed + 1``)."""

    def __post_init__(self) -> None:
        self.models, self.eval_rounds = tuple(self.models), tuple(self.eval_rounds)
        self.position_edges = tuple(self.position_edges)
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"models must be a non-empty list without repeats, got {list(self.models)}")
        for label in self.models:
            check_model_label(label)
        edges = (0, *self.position_edges, self.seq_len)
        if any(a >= b for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"position_edges must rise strictly inside (0, seq_len={self.seq_len}), "
                             f"got {list(self.position_edges)}")  # fmt: skip
        if self.local_window < 2 or self.local_window % 2:
            raise ValueError(f"local_window must be an even int >= 2, got {self.local_window!r}")
        for name in ("eval_windows", "bucket_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.seq_len % self.bucket_size or self.seq_len % (self.local_window // 2):
            raise ValueError(f"seq_len ({self.seq_len}) must be a multiple of bucket_size and local_window / 2")
        for label in self.models:
            self.model_config(label)  # checks the sizes
        self.train_config()

    def buckets(self) -> list[tuple[int, int]]:
        """The position buckets ``[(start, end), ...]`` covering ``0..seq_len``."""
        edges = (0, *self.position_edges, self.seq_len)
        return list(zip(edges, edges[1:], strict=False))

    def model_config(self, label: str) -> ReformerConfig:
        """A causal byte model; the same sizes and axial positions for every label."""
        attention: dict = dict(n_hashes=parse_attention(label) or 1) if label.startswith("lsh-") else {}
        if label == "transformer":
            attention = dict(residual="standard", shared_qk=False, use_full_attn=True)
        elif label == "full":
            attention = dict(use_full_attn=True)
        elif label == "local":
            attention = dict(attn_layers=("local",), bucket_size=self.local_window // 2)
        return ReformerConfig(**{
            "num_tokens": 256, "dim": self.dim, "depth": self.depth, "heads": self.heads,
            "max_seq_len": self.seq_len, "bucket_size": self.bucket_size, "causal": True,
            "axial_position_shape": (self.seq_len // self.bucket_size, self.bucket_size), **attention,
        })  # fmt: skip

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
            warmup_steps=self.warmup_steps, eval_every=self.eval_every, save_every=self.eval_every, keep_last=1,
            eval_batches=self.eval_batches, seed=self.seed,
        )  # fmt: skip


#: ``--scale``: ``cpu`` (the default) is sized for about six hours of 2-core compute in all
#: (docs/long-context.md); ``pilot`` is a few minutes per model to check the machinery and the
#: time per step; ``gpu`` a larger model and budget for one GPU.
LONGCTX_SCALES = {
    "cpu": LongCtxConfig(),
    "pilot": LongCtxConfig(steps=60, warmup_steps=10, eval_every=30, eval_batches=2, eval_windows=32),
    "gpu": LongCtxConfig(
        steps=20_000,
        batch_size=8,
        lr=1e-3,
        warmup_steps=1000,
        eval_every=1000,
        eval_batches=8,
        eval_windows=1024,
        dim=512,
        depth=6,
        heads=8,
    ),
}


def document_windows(docs: Documents, seq_len: int, max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts ``(n,)`` (in ``docs.tokens``) of non-overlapping windows of ``seq_len + 1``
    tokens, each inside one document, and the document of each ``(n,)``; at most ``max_windows``,
    spread evenly over all such windows in order. Raises when there is none."""
    starts, owners = [], []
    for i, (lo, hi) in enumerate(zip(docs.offsets[:-1].tolist(), docs.offsets[1:].tolist(), strict=True)):
        count = (hi - lo) // (seq_len + 1)
        starts += [lo + k * (seq_len + 1) for k in range(count)]
        owners += [i] * count
    if not starts:
        raise ValueError(f"no validation document has the {seq_len + 1:,} bytes a window of seq_len needs")
    n = min(max_windows, len(starts))
    picked = [j * len(starts) // n for j in range(n)]  # distinct: the step len / n is >= 1
    return torch.tensor([starts[j] for j in picked]), torch.tensor([owners[j] for j in picked])


@torch.no_grad()
def position_losses(model: ReformerLM, tokens: torch.Tensor, starts: torch.Tensor, seq_len: int,
                    batch_size: int) -> torch.Tensor:  # fmt: skip
    """Next-token loss in bits ``(n_windows, seq_len)``: position ``i`` of window ``w`` is the
    loss of predicting ``tokens[starts[w] + i + 1]`` from the ``i + 1`` tokens before it."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    offsets = torch.arange(seq_len + 1)
    rows = []
    for chunk in starts.split(batch_size):
        batch = tokens[chunk[:, None] + offsets].long().to(device)  # (b, seq_len + 1)
        logits = model(batch[:, :-1]).float()  # (b, seq_len, 256)
        rows.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").cpu())
    model.train(was_training)
    return torch.cat(rows) / math.log(2)


def clustered_mean(values: torch.Tensor, groups: torch.Tensor) -> tuple[float, float]:
    """Mean of ``values`` ``(n,)`` and its standard error with ``groups`` ``(n,)`` as clusters
    (the usual sandwich estimate, ``G / (G - 1)`` corrected; the plain one with one window per
    group). 0 when there is a single group."""
    values = values.double()
    mean = values.mean()
    ids = torch.unique(groups, return_inverse=True)[1]
    n_groups = int(ids.max()) + 1
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, ids, values - mean)  # (G,)
    var = (sums**2).sum() / len(values) ** 2 * (n_groups / (n_groups - 1) if n_groups > 1 else 0.0)
    return float(mean), float(var.sqrt())


def summarize(losses: torch.Tensor, owners: torch.Tensor, buckets: list[tuple[int, int]]) -> dict:
    """Bits per byte of every window and of every position bucket, with clustered errors."""
    per_window = losses.mean(1)  # (n,)
    by_bucket = torch.stack([losses[:, a:b].mean(1) for a, b in buckets], 1)  # (n, n_buckets)
    bpb, se = clustered_mean(per_window, owners)
    return {
        "bpb": bpb, "se": se,
        "by_position": [list(clustered_mean(by_bucket[:, k], owners)) for k in range(len(buckets))],
        "windows": [round(x, 5) for x in per_window.tolist()],
        "windows_by_position": [[round(x, 5) for x in row] for row in by_bucket.tolist()],
    }  # fmt: skip


def eval_settings(cfg: LongCtxConfig, label: str) -> list[str]:
    """Attention each trained model is evaluated with: as trained; LSH models also with
    ``cfg.eval_rounds`` rounds and full attention."""
    if not label.startswith("lsh-"):
        return ["trained"]
    extra = [f"lsh-{n}" for n in cfg.eval_rounds if f"lsh-{n}" != label]
    return ["trained", *extra, "full"]


def evaluate_model(model: ReformerLM, cfg: LongCtxConfig, label: str, valid: Documents) -> dict:
    """:func:`summarize` for each of :func:`eval_settings` (the model's attention is restored)."""
    starts, owners = document_windows(valid, cfg.seq_len, cfg.eval_windows)
    results = {"n_windows": len(starts), "n_documents": len(torch.unique(owners))}
    original = model.config
    for setting in eval_settings(cfg, label):
        if setting != "trained":
            n_hashes = parse_attention(setting)
            switch_attention(model, n_hashes=n_hashes, full_attention=n_hashes is None)
        losses = position_losses(model, valid.tokens, starts, cfg.seq_len, cfg.batch_size)
        results[setting] = summarize(losses, owners, cfg.buckets())
        if setting != "trained":
            switch_attention(model, n_hashes=original.n_hashes, full_attention=original.use_full_attn)
    results["window_documents"] = owners.tolist()
    return results


_PROBE = """
import json, sys, time, torch
from reformer import ReformerConfig, ReformerLM
config, batch, device = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = ReformerLM(config=ReformerConfig.from_dict(config)).to(device)
tokens = torch.randint(0, 256, (batch, config["max_seq_len"] + 1), device=device)

def step():  # as reformer.train runs it
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()

def status(field):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

def timed_step():
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start

step()  # loads the kernels' code and workspaces, which are not the step's memory
model.zero_grad(set_to_none=True)
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    seconds = [timed_step()]
    peak = torch.cuda.max_memory_allocated() - before
else:
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set (VmHWM)
    before = status("VmRSS")
    seconds = [timed_step()]
    peak = (status("VmHWM") - before) * 1024
seconds += [timed_step() for _ in range(2)]
print(json.dumps({"peak_bytes": peak, "seconds_per_step": sorted(seconds)[1]}))
"""


def step_probe(config: ReformerConfig, batch_size: int, device: str) -> dict:
    """A training step (forward + backward, after a first one) in a fresh process: its peak
    memory above the memory before it (resident set on CPU, glibc returning freed blocks, so it
    is live memory; Linux; allocated memory on CUDA) and the median time of three steps, which,
    unlike the training's own timing, can be taken on an idle machine."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "REFORMER_KEEP_FREED_MEMORY": "0"}
    args = [sys.executable, "-c", _PROBE, json.dumps(config.to_dict()), str(batch_size), device]
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise ChildProcessError(f"the step probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cached_json(path: Path, key: dict, compute) -> dict:
    """``compute()``, stored in ``path`` with ``key``; read back while the key matches."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            return stored["value"]
    value = compute()
    _write_text(path, json.dumps({"key": key, "value": value}) + "\n")
    return value


def run_longctx(cfg: LongCtxConfig, out: Path, device: str = "cpu", only: tuple[str, ...] | None = None,
                progress: Progress | None = None, command: str | None = None) -> dict:  # fmt: skip
    """Train (or resume) the models of ``only`` (default: all of ``cfg.models``) in ``out``,
    evaluate them, and write the results of every model of the study finished so far, with
    ``command`` (the command line that reproduces the study, when it ran from one)."""
    only = cfg.models if only is None else tuple(only)
    unknown = [m for m in only if m not in cfg.models]
    if unknown:
        raise ValueError(f"models {unknown} are not in this study's models {list(cfg.models)}")
    src = load_pysrc()
    corpus = pysrc_corpus(src)
    claim_out_dir(out, {"experiment": "longctx", **asdict(cfg), "corpus_sha256": src.sha256})
    tcfg = cfg.train_config()
    for label in only:
        run_dir = out / f"train-{label}"
        model, state = train_setting(cfg.model_config(label), corpus.train, corpus.valid, tcfg, run_dir, device,
                                     progress)  # fmt: skip
        key = {"step": state.step, "eval_windows": cfg.eval_windows, "device": device}
        _cached_json(run_dir / RESULT_FILE, key, partial(model_results, cfg, label, model, state, src, device))
        if progress is not None:
            progress(f"{label}: trained and evaluated")
    results = {**collect_results(cfg, out, src.metadata(), device), "command": command}
    _write_text(out / "longctx.json", json.dumps(results, indent=1) + "\n")
    _write_text(out / "longctx.md", longctx_table(results))
    plot_longctx(results, out)
    return results


def model_results(cfg: LongCtxConfig, label: str, model: ReformerLM, state: TrainState, src: PySrc,
                  device: str) -> dict:  # fmt: skip
    """A trained model's entry in the results: training time and curve, evaluations, memory."""
    return {
        **training_summary(state, cfg.train_config()),
        **evaluate_model(model, cfg, label, src.splits["valid"]),
        **_probe_results(cfg, label, device),
    }


def _probe_results(cfg: LongCtxConfig, label: str, device: str) -> dict:
    probe = step_probe(cfg.model_config(label), cfg.batch_size, device)
    return {"peak_step_bytes": probe["peak_bytes"], "probe_seconds_per_step": probe["seconds_per_step"]}


def training_summary(state: TrainState, tcfg: TrainConfig) -> dict:
    """Training time in all, per step, and the validation curve ``[[step, seconds, bits/byte]]``
    (seconds: training steps only, summed over resumed sessions)."""
    seconds, curve = 0.0, []
    for record in state.history:
        seconds += tcfg.batch_size * tcfg.seq_len / record["tokens_per_s"]
        if "eval_bpc" in record:
            curve.append([record["step"], round(seconds, 2), record["eval_bpc"]])
    total = training_seconds(state, tcfg)
    return {"train_seconds": total, "seconds_per_step": total / max(1, state.step), "curve": curve}


def collect_results(cfg: LongCtxConfig, out: Path, corpus: dict, device: str) -> dict:
    """The results of every model of ``cfg`` finished in ``out`` (its cached evaluations)."""
    models = {}
    for label in cfg.models:
        path = out / f"train-{label}" / RESULT_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored["key"]["step"] == cfg.steps:
                models[label] = stored["value"]
    return {"config": asdict(cfg), "corpus": corpus, "device": device, "models": models,
            "not_yet_run": [m for m in cfg.models if m not in models]}  # fmt: skip


def paired_difference(results: dict, a: tuple[str, str], b: tuple[str, str]) -> tuple[float, float] | None:
    """Mean bits-per-byte difference ``a - b`` over the same windows and its clustered standard
    error; ``a``/``b`` are ``(model, setting)``. None when either is missing."""
    models = results["models"]
    try:
        wa, wb = (models[m][s]["windows"] for m, s in (a, b))
    except KeyError:
        return None
    owners = torch.tensor(models[a[0]]["window_documents"])
    return clustered_mean(torch.tensor(wa) - torch.tensor(wb), owners)


def verdict(diff: float, se: float) -> str:
    """A difference within two standard errors is reported as none."""
    return "no difference" if abs(diff) <= 2 * se else ("worse" if diff > 0 else "better")


def longctx_table(results: dict) -> str:
    cfg, models = results["config"], results["models"]
    meta = results["corpus"]
    buckets = config_from_dict(cfg).buckets()
    head = [f"{a}-{b}" for a, b in buckets]
    lines = [
        f"Long context on pysrc (Python {meta['python_version']} standard library, {meta['files']:,} files, "
        f"{meta['bytes']:,} bytes, sha256 {meta['sha256'][:16]}...), context {cfg['seq_len']:,}, "
        f"{cfg['depth']} layers of width {cfg['dim']}, {cfg['steps']:,} steps of {cfg['batch_size']} windows; "
        "validation bits per byte on windows inside one document, +- standard error (clustered by document)",
        "",
        "| model | evaluated with | bits/byte | vs full (paired) | "
        + " | ".join(head)
        + " | s/step (training) | s/step (alone) | peak MB |",
        "|---" * (7 + len(head)) + "|",
    ]
    for label, m in models.items():
        for setting in [k for k in m if isinstance(m[k], dict) and "bpb" in m[k]]:
            r = m[setting]
            diff = paired_difference(results, (label, setting), ("full", "trained"))
            vs = "-" if diff is None or (label, setting) == ("full", "trained") else \
                f"{diff[0]:+.3f} +- {diff[1]:.3f} ({verdict(*diff)})"  # fmt: skip
            cells = " | ".join(f"{x:.3f} +- {e:.3f}" for x, e in r["by_position"])
            cost = " | | "  # the training cost is the trained attention's
            if setting == "trained":
                alone = f"{m['probe_seconds_per_step']:.2f}" if "probe_seconds_per_step" in m else "-"
                cost = f"{m['seconds_per_step']:.2f} | {alone} | {m['peak_step_bytes'] / 2**20:,.0f}"
            lines.append(f"| {label} | {setting} | {r['bpb']:.3f} +- {r['se']:.3f} | {vs} | {cells} | {cost} |")
    if models:
        first = next(iter(models.values()))
        lines += ["", f"{first['n_windows']} windows from {first['n_documents']} documents; a difference within "
                  "two standard errors is reported as no difference.", ""]  # fmt: skip
    else:
        lines += ["", "No model finished yet.", ""]
    if results["not_yet_run"]:
        lines += [f"Not yet run: {', '.join(results['not_yet_run'])}.", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += targets(results)
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[str]:
    """The issue's targets, reported whether met or not (or not yet measurable)."""
    out = []
    lsh8 = paired_difference(results, ("lsh-8", "trained"), ("full", "trained"))
    if lsh8 is not None:
        met = "met" if lsh8[0] <= 0.03 else "not met"
        out.append(f"Target: LSH-8 within 0.03 bits/byte of full attention: {lsh8[0]:+.3f} +- {lsh8[1]:.3f} ({met}).")
    cfg = results["config"]
    buckets = config_from_dict(cfg).buckets()
    for label in [m for m in results["models"] if m.startswith("lsh-")]:
        reach = (cfg["depth"] + 1) * cfg["local_window"]  # local's layers reach at most this far back
        far = [k for k, (a, _) in enumerate(buckets) if a >= reach]  # positions with context beyond it
        if "local" not in results["models"] or not far:
            continue
        k = far[-1]
        wa = [row[k] for row in results["models"][label]["trained"]["windows_by_position"]]
        wb = [row[k] for row in results["models"]["local"]["trained"]["windows_by_position"]]
        owners = torch.tensor(results["models"][label]["window_documents"])
        diff, se = clustered_mean(torch.tensor(wa) - torch.tensor(wb), owners)
        out.append(f"Target: {label} beats local attention at the farthest positions: {diff:+.3f} +- {se:.3f} "
                   f"bits/byte ({verdict(diff, se)}).")  # fmt: skip
    return out


def plot_longctx(results: dict, out: Path) -> None:
    """``longctx-curves.png`` (validation bits per byte vs steps and vs seconds) and
    ``longctx-positions.png`` (bits per byte by position bucket)."""
    from .plots import finish_axes, pyplot, save_png

    plt = pyplot()
    models = results["models"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, m in models.items():
        steps, seconds, bpb = zip(*m["curve"], strict=True) if m["curve"] else ((), (), ())
        axes[0].plot(steps, bpb, "o-", markersize=3, label=label)
        axes[1].plot(seconds, bpb, "o-", markersize=3, label=label)
    for ax, xlabel in zip(axes, ("step", "training seconds"), strict=True):
        finish_axes(ax, xlabel, "validation bits per byte")
    save_png(fig, out / "longctx-curves.png")

    cfg = results["config"]
    buckets = config_from_dict(cfg).buckets()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, m in models.items():
        mean, se = zip(*m["trained"]["by_position"], strict=True)
        ax.errorbar(range(len(buckets)), mean, yerr=[2 * e for e in se], marker="o", capsize=3, label=label)
    ax.set_xticks(range(len(buckets)), [f"{a}-{b}" for a, b in buckets])
    finish_axes(ax, "position in the context", "bits per byte (+- 2 standard errors)")
    save_png(fig, out / "longctx-positions.png")


def publish(out: Path, dest: Path) -> None:
    """Copy the study's result files from ``out`` into ``dest`` (e.g. ``docs/long-context``)."""
    copy_results(out, dest, PUBLISHED)


def config_from_dict(data: dict) -> LongCtxConfig:
    return LongCtxConfig(**data)


def with_overrides(cfg: LongCtxConfig, **overrides) -> LongCtxConfig:
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
