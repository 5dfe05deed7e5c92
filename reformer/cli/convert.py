"""``reformer convert``: a Hugging Face transformers Reformer checkpoint as ours."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import UsageError


def add_parser(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    c = subparsers.add_parser("convert", help="convert a Hugging Face transformers Reformer checkpoint",
                              formatter_class=fmt)  # fmt: skip
    c.add_argument("--from-transformers", required=True, metavar="DIR",
                   help="directory of a transformers ReformerModelWithLMHead or ReformerForMaskedLM")  # fmt: skip
    c.add_argument("--out", required=True, help="checkpoint directory to write (config.json, model.safetensors)")
    c.add_argument("--byte-vocab", action="store_true",
                   help="258-token byte model (google/reformer-enwik8, id = byte + 2): keep the byte ids")  # fmt: skip
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import from_transformers

    out = Path(args.out)
    if (out / "config.json").exists():
        raise UsageError(f"{out} already holds a checkpoint; choose another --out")
    try:
        model = from_transformers(args.from_transformers, byte_vocab=args.byte_vocab)
    except (ImportError, OSError) as exc:  # transformers missing, or an unreadable checkpoint
        raise UsageError(str(exc).strip().splitlines()[0]) from None
    model.float().save_pretrained(out)
    cfg = model.config
    kind = "causal" if cfg.causal else "masked"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{out}: ReformerLM ({kind}, {cfg.depth} layers {'/'.join(cfg.layer_kinds())}, {cfg.num_tokens} tokens, "
          f"{n_params / 1e6:.2f}M parameters)")  # fmt: skip
    return 0
