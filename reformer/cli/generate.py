"""``reformer generate``: sample a continuation of a prompt, streamed to stdout."""

from __future__ import annotations

import argparse
import sys
import time

from .options import UsageError, add_checkpoint_arguments, device_type, float_in, int_at_least, seed_type


def add_parser(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    g = subparsers.add_parser("generate", help="sample a continuation of a prompt", formatter_class=fmt)
    add_checkpoint_arguments(g)
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int_at_least(0), default=200, help="tokens to sample")
    g.add_argument("--temperature", type=float_in(0), default=0.8, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-k", type=int_at_least(1), default=None, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=0.95, help="nucleus sampling mass")
    g.add_argument("--seed", type=seed_type, default=None, help="random seed")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    g.add_argument("--device", type=device_type, default="cpu", help="cpu or cuda")
    g.add_argument(
        "--compile",
        action="store_true",
        help="run the decode step through torch.compile (the first step compiles it: up to a minute)",
    )
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import TextStream
    from ..generate import stream
    from ..heads import ReformerForMaskedLM
    from .loading import load_for_inference

    if not args.prompt:
        raise UsageError("--prompt must not be empty")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # bytes of another encoding, which argv keeps as surrogates
        raise UsageError(f"--prompt is not UTF-8 text (a byte at character {exc.start}); give it in UTF-8") from None
    model, vocab, ckpt = load_for_inference(args.checkpoint, args.device, args.revision)
    if isinstance(model, ReformerForMaskedLM):
        raise UsageError(f"{ckpt} holds a masked language model: it does not generate left to right")
    prompt = vocab.encode(args.prompt)[None].to(args.device)
    out = sys.stdout
    out.write(args.prompt)
    text = TextStream(vocab, prompt[0])
    if args.compile and args.no_cache:
        raise UsageError("--compile compiles the cached decode step: it cannot be combined with --no-cache")
    if args.compile:
        print("torch.compile: the first decode step compiles it (it can take a minute)", file=sys.stderr)
    tokens = stream(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache, compile=args.compile)  # fmt: skip
    seconds = []  # per token: the prefill, the first decode step, then the others
    start = time.perf_counter()
    for token in tokens:
        t = int(token[0])
        out.write(text.step(t))
        out.flush()
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
    out.write(text.finish() + "\n")
    if args.compile and len(seconds) > 2:
        rest = sum(seconds[2:]) / len(seconds[2:])
        print(f"torch.compile: first decode step {seconds[1]:.1f} s (compiling), then {rest * 1000:.1f} ms per token",
              file=sys.stderr)  # fmt: skip
    return 0
