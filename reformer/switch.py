"""Change a trained model's attention for evaluation: other ``n_hashes``, or dense attention.

The paper's Table 2 evaluates every trained model with every setting. Shared-QK LSH and dense
shared-QK attention use the same projections, and ``n_hashes`` only sets how many random
rotations hash the keys, so switching changes no weight: it is a change of configuration. The
switch is recorded in ``model.config``, so ``save_pretrained`` writes what the model now
computes and ``ReformerLM(config=model.config)`` with the same weights is the same function.
(``reformer eval --n-hashes`` / ``--full-attention`` switch in memory and write nothing.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

from .attention import LSHSelfAttention
from .checks import check_int
from .model import Reformer, ReformerLM

M = TypeVar("M", Reformer, ReformerLM)


def switch_attention(model: M, *, n_hashes: int | None = None, full_attention: bool | None = None) -> M:
    """Switch ``model``'s attention in place and return it.

    ``n_hashes``: hashing rounds of every LSH layer (eval rotations are redrawn from the layer's
    seed for the new count). ``full_attention=True``: every LSH layer attends densely (shared QK,
    same masks); ``False``: every dense layer goes back to LSH. ``None`` leaves either as it is.
    Local layers are never changed. Raises ``ValueError`` when the model has no LSH layer.
    """
    stack = model.reformer if isinstance(model, ReformerLM) else model
    if not isinstance(stack, Reformer):
        raise TypeError(f"model must be a Reformer or ReformerLM, got {type(model).__name__}")
    layers = [m for m in stack.modules() if isinstance(m, LSHSelfAttention) and m.n_local_attn_heads < m.heads]
    if not layers:
        raise ValueError("the model has no LSH attention layer to switch (only local attention)")
    cfg = model.config
    changes: dict = {}
    if n_hashes is not None:
        changes["n_hashes"] = check_int("n_hashes", n_hashes, 1)
    if full_attention is not None:
        old, new = ("lsh", "full") if full_attention else ("full", "lsh")
        if cfg.attn_layers is None:
            changes["use_full_attn"] = bool(full_attention)
        else:
            changes["attn_layers"] = tuple(new if kind == old else kind for kind in cfg.attn_layers)
    switched = replace(cfg, **changes)
    # Set every layer as the model constructor would from the new config.
    for block, kind in zip(stack.blocks, switched.layer_kinds(), strict=True):
        for module in block.modules():
            if isinstance(module, LSHSelfAttention):
                module.use_full_attn = kind == "full"
                module.lsh_attn.n_hashes = switched.n_hashes
    model.config = stack.config = switched
    return model
