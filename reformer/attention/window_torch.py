"""Window attention in torch ops, block by block: the portable path (any device and dtype).

A block gathers one contiguous run of packed ``[q | k | v]`` rows (``ext`` order: the ``c``
slots before its queries, then its own, :class:`~.window_plan.WindowPlan`); its queries are the
run's tail and its windows strided views of it, not copies. Gradients are summed over the run
with ``(c + s) / s`` strided adds, then added back with one ``index_add_`` per block. Nothing of
the size of the sorted sequence is built except the per-slot outputs and log-sum-exps, so
temporaries stay small (on CPU, large fresh allocations cost page faults that can take longer
than the arithmetic).

:class:`TorchWindows` is the algorithm; :class:`~.window_kernels.KernelWindows` runs the same
one with the CPU C kernels in place of its row steps.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch

from ..native.workers import run_parts
from .common import norm_floor, unit_keys_and_norms
from .slots import round_weights
from .window_plan import Block, WindowPlan


class BlockInputs(NamedTuple):
    run: torch.Tensor  # (rows, m * s + c, 2d + dv) the block's key run of packed [q | k | v] rows
    q: torch.Tensor  # (blk, s, d) scaled queries (the run's last m * s rows)
    k: torch.Tensor  # (blk, c + s, d) unit keys of each window (strided views of the run)
    v: torch.Tensor  # (blk, c + s, dv)


class BlockGrads(NamedTuple):
    """A block's gradients of its queries and of each window's keys and values."""

    q: torch.Tensor  # (blk, s, d)
    k: torch.Tensor  # (blk, c + s, d)
    v: torch.Tensor  # (blk, c + s, dv)


class BackwardInputs(NamedTuple):
    """What the backward of every block reads."""

    qkv: torch.Tensor  # (b * lp, 2d + dv) packed rows, as the forward made them
    probs: torch.Tensor  # (windows, s, c + s) attention weights (before dropout)
    grad_out: torch.Tensor  # (b * lp, dv) gradient of the output
    g_dot_out: torch.Tensor  # (b * lp,) its product with the output
    weight: torch.Tensor  # (b, total) the slots' round weights


class TorchWindows:
    """The attention of every window of ``plan`` and the combination of rounds, on packed
    ``[q | k | v]`` rows of ``d`` query/key and ``dv`` value features.

    The row steps (packing, gathers, softmax and its backward, the gradients' way back to rows)
    are methods, which :class:`~.window_kernels.KernelWindows` replaces by C kernels.
    """

    def __init__(self, plan: WindowPlan, d: int, dv: int):
        self.plan, self.d, self.dv = plan, d, dv

    # Row steps.

    def pack_qkv(self, qk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[q | k | v]`` rows ``(r, 2d + dv)`` of the scaled queries ``qk / sqrt(d)`` (cheaper than
        scaling logits), the unit keys and the values, and the norms ``(r, 1)`` of ``qk``."""
        d = self.d
        qkv = qk.new_empty(qk.shape[0], 2 * d + self.dv)
        qkv[:, :d] = qk
        qkv[:, :d] *= d**-0.5
        qkv[:, d : 2 * d], norm = unit_keys_and_norms(qk)
        qkv[:, 2 * d :] = v
        return qkv, norm

    def gather(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` ``(r, e)`` at ``rows`` ``(a, k)`` -> ``(a, k, e)``."""
        return x.index_select(0, rows.flatten()).view(*rows.shape, x.shape[-1])

    def block_probs(self, dots: torch.Tensor, blk: Block, probs: torch.Tensor) -> torch.Tensor:
        """Masks ``dots`` ``(blk, s, c + s)``, writes the attention weights into ``probs`` (same
        shape, may be ``dots``) and returns the per-query log-sum-exp ``(blk, s)``."""
        self.plan.mask_(dots, blk)
        if self.plan.exp_lse_softmax:  # trax / HF: exp(x - lse), not renormalised where lse is rounded
            lse = torch.logsumexp(dots, dim=-1)
            torch.exp(dots - lse[..., None], out=probs)
            return lse
        # Normalise by the sum (exact for self-only queries, where an fp32 lse near -5e4 is only
        # good to ~4e-3); lse = max(x) - log(max(p)) needs no second exponential.
        top = dots.amax(dim=-1)
        torch.softmax(dots, dim=-1, out=probs)
        return top - probs.amax(dim=-1).log()

    def softmax_backward_(self, grad: torch.Tensor, probs: torch.Tensor, shift: torch.Tensor, blk: Block) -> None:
        """In place, ``grad`` ``(blk, s, c + s)`` of the weights -> of the logits: ``p * (grad - shift)``
        (``shift`` ``(blk, s, 1)``). Hidden entries have ``p == 0``; the own-key logit is a constant:
        no gradient through it."""
        grad.sub_(shift).mul_(probs)
        self.plan.fill_self_(grad, 0.0, self.plan.self_mask(blk))

    def add_block_grads(self, grad: torch.Tensor, key_rows: torch.Tensor, run: torch.Tensor, grads: BlockGrads) -> None:
        """Adds a block's gradients to the ``[q | k | v]`` rows of ``grad`` ``(r, 2d + dv)`` at its key
        runs' rows ``key_rows`` ``(rows, m * s + c)`` (``run``: the block's gathered inputs, for the
        shape): its queries' (the runs' tails), and each window's keys' and values', summed over
        the windows that hold each key."""
        d = self.d
        acc = torch.zeros_like(run)
        acc[:, self.plan.c :, :d] = grads.q.view(acc.shape[0], -1, d)
        _add_window_grads(acc[..., d : 2 * d], grads.k, self.plan)
        _add_window_grads(acc[..., 2 * d :], grads.v, self.plan)
        grad.index_add_(0, key_rows.flatten(), acc.flatten(0, 1))

    def qk_grad(self, qkv: torch.Tensor, norm: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Gradient for ``qk`` from those of ``q = qk / sqrt(d)`` and ``k = qk / max(|qk|, floor)``
        (``qkv``, ``grad`` ``(r, 2d + dv)``, ``norm`` ``(r, 1)``, as the forward computed it):
        ``g_q / sqrt(d) + (g_k - k (k . g_k)) / |qk|``, where a norm under the floor passes
        ``g_k / floor`` (the clamp is flat there). Computed in place in ``grad``'s columns (no
        full-size temporaries); returns a view of them."""
        d = self.d
        k, grad_q, grad_k = qkv[:, d : 2 * d], grad[:, :d], grad[:, d : 2 * d]
        floor = norm_floor(norm.dtype)
        along_k = torch.where(norm > floor, (k * grad_k).sum(-1, keepdim=True), 0).to(grad.dtype)
        grad_k.addcmul_(k, along_k, value=-1).mul_((1 / norm.clamp_min(floor)).to(grad.dtype))
        return grad_q.mul_(d**-0.5).add_(grad_k)

    # The algorithm.

    def forward(self, qkv: torch.Tensor, all_probs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the windows of ``qkv`` ``(b * lp, 2d + dv)``, rounds combined by their
        log-sum-exp: returns ``out`` ``(b, lp, dv)`` and the slots' round weights ``(b * total,)``;
        writes the probabilities into ``all_probs`` ``(windows, s, c + s)`` unless it is None."""
        plan, dv = self.plan, self.dv
        slot_out = qkv.new_empty(plan.n_windows, plan.s, dv)
        slot_lse = qkv.new_empty(plan.n_windows, plan.s)
        out = qkv.new_empty(plan.rows, plan.lp, dv)
        slot_weight = slot_lse.new_empty(slot_lse.numel())

        def attend(rows: range) -> None:
            for blk in plan.blocks(rows):
                probs, v = self.block_attention(qkv, blk, all_probs, slot_lse)
                torch.bmm(probs, v, out=slot_out[blk.start : blk.end])  # (blk, s, dv)

        parts = plan.parts(qkv.device)
        run_parts([partial(attend, rows) for rows in parts])
        combine = partial(self.combine_rounds, slot_out.view(-1, dv), slot_lse.view(-1), out, slot_weight)
        run_parts([partial(combine, rows) for rows in parts])
        return out, slot_weight

    def block_attention(
        self, qkv: torch.Tensor, blk: Block, all_probs: torch.Tensor | None, slot_lse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's attention weights ``(blk, s, c + s)`` (kept in ``all_probs`` unless it is None;
        returned after dropout) and its windows' values ``(blk, c + s, dv)``; its queries'
        log-sum-exps go into ``slot_lse`` ``(windows, s)``."""
        plan = self.plan
        x = self.block_inputs(qkv, blk)
        dots = torch.bmm(x.q, x.k.transpose(1, 2))  # (blk, s, c + s)
        probs = dots if all_probs is None else all_probs[blk.start : blk.end]
        slot_lse[blk.start : blk.end].copy_(self.block_probs(dots, blk, probs))
        if plan.dropout is not None:  # (the backward recomputes the mask from the seed: nothing kept)
            probs = probs * plan.kept_by_dropout(blk) / (1 - plan.dropout.p)
        return probs, x.v

    def block_inputs(self, qkv: torch.Tensor, blk: Block) -> BlockInputs:
        """One gather per block: queries are the last ``m * s`` rows of the key run."""
        plan, d = self.plan, self.d
        run = self.gather(qkv, plan.key_run(plan.ext_row, blk))
        q = run[:, plan.c :, :d].reshape(-1, plan.s, d)
        return BlockInputs(run, q, plan.windows(run[..., d : 2 * d]), plan.windows(run[..., 2 * d :]))

    def combine_rounds(
        self, slot_out: torch.Tensor, slot_lse: torch.Tensor, out: torch.Tensor, slot_weight: torch.Tensor, rows: range
    ) -> None:
        """Write into ``out`` ``(b, lp, dv)`` the rounds of each position of batch ``rows`` combined by
        their log-sum-exp, and into ``slot_weight`` ``(b * total,)`` every slot's round weight.
        ``slot_out`` ``(b * total, dv)`` (scaled by the weights in place), ``slot_lse`` ``(b * total,)``.
        Each slot's weighted output is added to its position's row: no gather of the outputs."""
        plan = self.plan
        index = plan.round_slot[rows.start : rows.stop]  # (rows, h, lp) slot of each position's rounds
        total = plan.slot_row.shape[1]
        slot_weight[index] = round_weights(slot_lse[index], plan.exp_lse_softmax)
        mine = slice(rows.start * total, rows.stop * total)
        weighted = slot_out[mine].mul_(slot_weight[mine, None].to(slot_out.dtype))
        # only this part's rows, offset to them: other parts write the rest of ``out`` meanwhile
        first = rows.start * plan.lp
        part_out = out[rows.start : rows.stop].view(-1, out.shape[-1]).zero_()
        part_out.index_add_(0, plan.slot_row[rows.start : rows.stop].flatten() - first, weighted)

    def backward(
        self,
        qkv: torch.Tensor,
        all_probs: torch.Tensor,
        grad_out: torch.Tensor,
        out: torch.Tensor,
        slot_weight: torch.Tensor,
    ) -> torch.Tensor:
        """The gradient ``(b * lp, 2d + dv)`` of the ``[q | k | v]`` rows for ``grad_out`` ``(b, lp, dv)``
        of the forward's ``out``, from its probabilities and round weights."""
        plan, dv = self.plan, self.dv
        grad_out = grad_out.to(out.dtype)
        # Through the round combination out = sum_r w_r o_r, a slot of round r gets the output
        # gradient w_r * g; its softmax backward p * (dp - sum(dp * p)) then has
        # sum(dp * p) - dlse_r = w_r * (g . out): the rounds' lse gradient folds into one shift.
        inputs = BackwardInputs(
            qkv=qkv,
            probs=all_probs,
            grad_out=grad_out.reshape(-1, dv).contiguous(),
            g_dot_out=(grad_out * out).sum(-1).flatten(),
            weight=slot_weight.view(plan.rows, -1),
        )
        grad = torch.zeros_like(qkv)

        def attend_backward(rows: range) -> None:
            # only this part's rows of ``grad``, offset to them (index_add_ of reduced-precision
            # types rewrites all of its target: parts running meanwhile must not share it)
            part_grad = grad[rows.start * plan.lp : rows.stop * plan.lp]
            self.backward_rows(inputs, rows, part_grad)

        run_parts([partial(attend_backward, rows) for rows in plan.parts(qkv.device)])
        return grad

    def backward_rows(self, inputs: BackwardInputs, rows: range, grad: torch.Tensor) -> None:
        """The backward of batch ``rows``' windows, added to ``grad``: the part's rows of the
        gradient, from its first row."""
        plan, s, dv = self.plan, self.plan.s, self.dv
        first = rows.start * plan.lp
        for blk in plan.blocks(rows):
            query_rows, key_rows = plan.query_slots(plan.slot_row, blk), plan.key_run(plan.ext_row, blk)
            x = self.block_inputs(inputs.qkv, blk)
            w = plan.query_slots(inputs.weight, blk).reshape(-1, s, 1)  # (blk, s, 1)
            go = self.gather(inputs.grad_out, query_rows).view(-1, s, dv) * w  # (blk, s, dv)
            shift = inputs.g_dot_out[query_rows.flatten()].view(-1, s, 1) * w  # (blk, s, 1)
            probs = inputs.probs[blk.start : blk.end]  # (blk, s, c + s)
            keep = None
            if plan.dropout is not None:
                keep = plan.kept_by_dropout(blk).to(probs.dtype) / (1 - plan.dropout.p)
            used = probs if keep is None else probs * keep
            grad_v = torch.bmm(used.transpose(1, 2), go)  # (blk, c + s, dv) per window key
            grad_dots = torch.bmm(go, x.v.transpose(1, 2))  # (blk, s, c + s)
            if keep is not None:
                grad_dots *= keep
            self.softmax_backward_(grad_dots, probs, shift, blk)
            grad_q = torch.bmm(grad_dots, x.k)  # (blk, s, d)
            grad_k = torch.bmm(grad_dots.transpose(1, 2), x.q)  # (blk, c + s, d) per window key
            self.add_block_grads(grad, key_rows - first, x.run, BlockGrads(grad_q, grad_k, grad_v))


def _add_window_grads(acc: torch.Tensor, grad: torch.Tensor, plan: WindowPlan) -> None:
    """``acc`` ``(rows, m * s + c, e)`` (a block's key run) += ``grad`` ``(blk, c + s, e)`` of its
    windows: a window's keys are ``(c + s) / s`` consecutive groups of ``s`` run rows, so this is
    one strided add per group, not a scatter."""
    s, groups = plan.s, plan.width // plan.s
    rows, run, e = acc.shape
    m = (run - plan.c) // s
    per_group = acc.view(rows, run // s, s, e)
    grad = grad.view(rows, m, groups, s, e)
    for g in range(groups):  # window j's group g is run group j + g
        per_group[:, g : g + m] += grad[:, :, g]
