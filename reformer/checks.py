"""Argument and input checks shared by every layer (the bottom of the package's layering: it
imports nothing of ``reformer``): one clear ``ValueError`` naming the argument and what is allowed."""

from __future__ import annotations

import torch


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_prob(name: str, value: object) -> float:
    """``value`` as a float if it is a probability in [0, 1), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def resolve_dim_head(dim: int, heads: int, dim_head: int | None) -> int:
    """Per-head width: ``dim_head`` if given, else ``dim // heads`` (which must divide)."""
    check_int("dim", dim, 1)
    check_int("heads", heads, 1)
    if dim_head is None:
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) unless dim_head is given")
        dim_head = dim // heads
    return check_int("dim_head", dim_head, 1)


def check_features(name: str, x: object, dim: int) -> None:
    """``x`` must be a floating-point ``(batch, len, dim)`` tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (batch, len, {dim}), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """A mask is a bool tensor of exactly ``shape`` (True = attend), or None."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor (True = keep), got {got}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def check_extra_keys(keys: torch.Tensor | None, context_mask: torch.Tensor | None, batch: int, dim: int) -> int:
    """Extra keys every query may see, ``(batch, c, dim)``, and their ``context_mask``
    ``(batch, c)`` (bool, True = real); returns ``c`` (0 without keys)."""
    if keys is None:
        if context_mask is not None:
            raise ValueError("context_mask was given without keys")
        return 0
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.shape[0] != batch or keys.shape[2] != dim:
        got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys must have shape ({batch}, n_keys, {dim}), got {got}")
    check_mask("context_mask", context_mask, (batch, keys.shape[1]))
    return keys.shape[1]


def check_qkv(qk: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    """Raise a clear error for tensors that do not form a ``(batch, len, d)`` attention input."""
    for name, t in (("qk", qk), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (batch, len, dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if qk.shape[:2] != v.shape[:2]:
        raise ValueError(f"qk and v must agree in (batch, len): qk is {tuple(qk.shape)}, v is {tuple(v.shape)}")
    if qk.dtype != v.dtype:
        raise ValueError(f"qk and v must have the same dtype, got {qk.dtype} and {v.dtype}")
    if qk.shape[1] == 0:
        raise ValueError("qk must have at least one position (len >= 1)")
    check_mask("input_mask", key_mask, qk.shape[:2])
