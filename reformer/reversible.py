"""Reversible residual blocks (RevNet, Gomez et al. 2017) with exact gradient replay.

A block maps ``(x1, x2)`` to ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``; its inputs can be
rebuilt from its outputs (``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``), so training keeps only
the last block's output, whatever the depth. In the backward pass each block is re-run to
get its gradients; the RNG state of its forward (dropout masks, training-mode LSH
rotations) and the autocast state are replayed, so the gradients are those of the same
network run non-reversibly. Results a block marks with :func:`remember` (LSH bucket ids) are
kept from its forward and handed back in its re-run instead of being computed again: cheaper,
and they are exactly the forward's, where inputs rebuilt by subtraction could round a
near-tie the other way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _HalfBlockState:
    """What one half-block's forward leaves for its re-run: the CPU and (if used) CUDA generator
    states at its start, and the results it marked with :func:`remember`, in call order."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None
        self.values: list[Any] = []
        self.replayed = 0

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Context of the forward: :func:`remember` keeps its results here."""
        token = _REMEMBERED.set(self)
        try:
            yield
        finally:
            _REMEMBERED.reset(token)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Context of the re-run: torch's RNG continues exactly from the recorded point, and
        :func:`remember` hands back the recorded results."""
        with torch.random.fork_rng(devices=[self.device] if self.device is not None else []):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            self.replayed = 0
            with self.recording():
                yield

    def take(self, compute: Callable[[], Any]) -> Any:
        if self.replayed < len(self.values):  # the re-run: the forward's value
            self.replayed += 1
            return self.values[self.replayed - 1]
        value = compute()
        self.values.append(value)
        self.replayed = len(self.values)
        return value


_REMEMBERED: ContextVar[_HalfBlockState | None] = ContextVar("reversible_remembered", default=None)


def remember(compute: Callable[[], Any]) -> Any:
    """``compute()``, except in the backward re-run of a reversible block, which gets the value
    its forward computed at the same call. Only for results that need no gradient and that
    consume no random numbers (draws must still happen in the re-run, to keep the RNG in step)."""
    if torch.compiler.is_compiling():  # no reversible function there (see reversible_apply)
        return compute()
    record = _REMEMBERED.get()
    return compute() if record is None else record.take(compute)


class ReversibleBlock(nn.Module):
    """One ``(f, g)`` pair. Of the call's keyword arguments (masks, keys, encoder context),
    ``f`` receives those named in ``f_args`` and ``g`` those named in ``g_args``."""

    def __init__(
        self,
        f: nn.Module,
        g: nn.Module,
        f_args: tuple[str, ...] = ("keys", "input_mask", "context_mask", "cache"),
        g_args: tuple[str, ...] = (),
    ):
        super().__init__()
        self.f, self.g = f, g
        self.f_args, self.g_args = f_args, g_args

    def run_f(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return self.f(x, **{k: v for k, v in kwargs.items() if k in self.f_args})

    def run_g(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return self.g(x, **{k: v for k, v in kwargs.items() if k in self.g_args})

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain (non-reversible) application, used below ``reverse_thres`` and in tests."""
        y1 = x1 + self.run_f(x2, kwargs)
        return y1, x2 + self.run_g(y1, kwargs)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _undo_half_residual(fn, wrt, state: _HalfBlockState, autocast, inp, out, grad_out, grad_inp):
    """For ``out = x + fn(inp)``: re-run ``fn`` as in the forward (same RNG, autocast and
    remembered results),
    backpropagate ``grad_out`` through it and return ``x``, the total gradient reaching ``inp``
    (``grad_inp`` plus the one through ``fn``) and the gradients of the tensors ``wrt`` (None
    for those ``fn`` does not use)."""
    with torch.enable_grad(), state.replay(), autocast:
        inp = inp.detach().requires_grad_()
        fx = fn(inp)
    d_inp, *d_wrt = torch.autograd.grad(fx, (inp, *wrt), grad_out, allow_unused=True)
    with torch.no_grad():
        return out - fx, grad_inp + d_inp, d_wrt


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


class _ReversibleFunction(torch.autograd.Function):
    # Parameters are inputs and their gradients outputs of backward, each produced once per
    # backward (however many blocks share it), like any autograd op: DDP's gradient hooks fire
    # once per parameter and its unused-parameter search sees them (it did not when the
    # backward accumulated into ``.grad`` by itself - the "mark a variable ready only once"
    # failure of other reversible implementations).
    @staticmethod
    def forward(ctx, x1, x2, blocks, kwargs, grad_names, *wrt):
        # wrt: the kwargs that require grad (e.g. encoder outputs), then the parameters.
        device_type = x1.device.type
        states = []
        with torch.no_grad():
            for block in blocks:
                f_state = _HalfBlockState(x1.device)
                with f_state.recording():
                    x1 = x1 + block.run_f(x2, kwargs)
                g_state = _HalfBlockState(x1.device)
                with g_state.recording():
                    x2 = x2 + block.run_g(x1, kwargs)
                states.append((f_state, g_state))
        ctx.blocks, ctx.kwargs, ctx.states, ctx.grad_names = blocks, kwargs, states, grad_names
        ctx.params = wrt[len(grad_names) :]
        ctx.autocast = (device_type, *_autocast_state(device_type))
        ctx.save_for_backward(x1.detach(), x2.detach(), *wrt[: len(grad_names)])
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2, *grad_tensors = ctx.saved_tensors
        device_type, autocast_on, autocast_dtype = ctx.autocast
        leaves = [t.detach().requires_grad_() for t in grad_tensors]
        kwargs = {**ctx.kwargs, **dict(zip(ctx.grad_names, leaves, strict=True))}
        autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_on else nullcontext()
        wrt = (*leaves, *ctx.params)
        grads = [None] * len(wrt)
        for block, (f_state, g_state) in zip(reversed(ctx.blocks), reversed(ctx.states), strict=True):
            # y2 = x2 + g(y1), then y1 = x1 + f(x2): undo g, then f.
            run_g, run_f = partial(block.run_g, kwargs=kwargs), partial(block.run_f, kwargs=kwargs)
            x2, dy1, d_g = _undo_half_residual(run_g, wrt, g_state, autocast, y1, y2, dy2, dy1)
            x1, dy2, d_f = _undo_half_residual(run_f, wrt, f_state, autocast, x2, y1, dy1, dy2)
            grads = [_add(a, _add(b, c)) for a, b, c in zip(grads, d_g, d_f, strict=True)]
            y1, y2 = x1, x2
        return (dy1, dy2, None, None, None, *grads)


def reversible_apply(
    blocks: Sequence[ReversibleBlock], x1: torch.Tensor, x2: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``blocks`` reversibly on ``(x1, x2)``; tensor ``kwargs`` that require grad (keys,
    encoder context) receive their gradients.

    Under ``torch.compile`` each block is checkpointed instead: Dynamo cannot trace the hand-written
    backward (it re-runs blocks and calls ``torch.autograd.grad``), but it traces activation
    checkpointing, which also re-runs each block in the backward with the forward's RNG state.
    The gradients are the same; the backward keeps one block input ``(b, n, dim)`` pair per block
    where the reversible function keeps none."""
    if torch.compiler.is_compiling():
        for block in blocks:
            x1, x2 = checkpoint(block, x1, x2, use_reentrant=False, **kwargs)
        return x1, x2
    grad_names = tuple(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad)
    params = {id(p): p for block in blocks for p in block.parameters() if p.requires_grad}  # shared ones once
    return _ReversibleFunction.apply(
        x1, x2, list(blocks), kwargs, grad_names, *(kwargs[k] for k in grad_names), *params.values()
    )


def irreversible_apply(
    blocks: Sequence[ReversibleBlock], x1: torch.Tensor, x2: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same computation with ordinary autograd (stores every block's activations)."""
    for block in blocks:
        x1, x2 = block(x1, x2, **kwargs)
    return x1, x2
