"""Window attention with the CPU C kernels of :mod:`reformer.cpu_kernels` (fp32 on CPU).

The algorithm of :class:`~.window_torch.TorchWindows`, with three changes:

* its row steps (packing, gathers, masks and softmax, the softmax backward, the gradients'
  way back to rows) are each one pass of a C kernel per row instead of several torch ops;
* the rounds are combined online (softmax round weights): each block's outputs are added to
  their positions' rows as they come, so no per-slot outputs are kept (``n_hashes`` x the
  output); with ``exp_lse`` round weights they are combined after all rounds, as there;
* strict causal windows with no mask beyond the strict one (:attr:`.WindowPlan.fused`) go
  through one fused kernel call per CPU worker part for the forward and one for the backward:
  matmuls in registers, softmax and gradients per window while its tiles are in cache.
"""

from __future__ import annotations

from functools import partial

import torch

from .. import cpu_kernels
from ..cpu_workers import run_parts, split_among_workers
from .common import norm_floor, self_logit
from .window_plan import Block, WindowPlan
from .window_torch import BackwardInputs, BlockGrads, TorchWindows

#: Windows of the fused kernels whose key run is gathered at once: a run of ``8 * s + c`` rows
#: (220 KB at ``c = 64``, dim_head 64) stays in cache with its transpose. 4 to 16 measured the
#: same at 4K-64K tokens with a 2 MB L2; 32 and 64 2-4% slower.
FUSED_CHUNK_WINDOWS = 8


class KernelWindows(TorchWindows):
    """:class:`~.window_torch.TorchWindows` with the CPU C kernels doing its row steps (and, for
    :attr:`.WindowPlan.fused` plans, its matmuls); their arguments are fp32 and contiguous."""

    # Row steps.

    def pack_qkv(self, qk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # rows split among the CPU workers, as torch would split an op among its threads
        d = self.d
        qkv = qk.new_empty(qk.shape[0], 2 * d + self.dv)  # (r, 2d + dv)
        norm = qk.new_empty(qk.shape[0], 1)  # (r, 1)
        pack, scale, floor = cpu_kernels.pack_qkv_, d**-0.5, norm_floor(qk.dtype)
        run_parts([partial(pack, qkv[r], norm[r], qk[r], v[r], scale, floor) for r in _row_parts(qk)])
        return qkv, norm

    def gather(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.gather_rows(x, rows)

    def block_probs(self, dots: torch.Tensor, blk: Block, probs: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        plan.mask_(dots, blk, strict_part=False)
        if plan.strict:  # the kernel applies the strict mask and the own-key logit
            span_row = plan.query_slots(plan.span_row, blk).flatten()
            self_value = self_logit(dots.dtype, plan.self_value)
            return cpu_kernels.strict_softmax(dots, probs, span_row, plan.s, plan.c, self_value, plan.exp_lse)
        return cpu_kernels.softmax(dots, probs, plan.exp_lse)

    def softmax_backward_(self, grad: torch.Tensor, probs: torch.Tensor, shift: torch.Tensor, blk: Block) -> None:
        plan = self.plan
        cpu_kernels.softmax_backward_(grad, probs, shift, plan.c, plan.strict)
        if not plan.strict:  # (strict: the kernel zeroes the own-key entries)
            plan.fill_self_(grad, 0.0, plan.self_mask(blk))

    def add_block_grads(self, grad: torch.Tensor, key_rows: torch.Tensor, run: torch.Tensor, grads: BlockGrads) -> None:
        # in one pass, with no run-sized buffer
        cpu_kernels.window_grads_to_rows_(grad, key_rows, *grads, self.plan.s, self.plan.c)

    def qk_grad(self, qkv: torch.Tensor, norm: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        d = self.d
        fold, scale, floor = cpu_kernels.fold_qk_grad_, d**-0.5, norm_floor(norm.dtype)
        run_parts([partial(fold, grad[r], qkv[r], norm[r], d, scale, floor) for r in _row_parts(grad)])
        return grad[:, :d]

    # The algorithm.

    def forward(self, qkv: torch.Tensor, all_probs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        plan, dv = self.plan, self.dv
        if plan.exp_lse:  # exp(lse) round weights: combined after all rounds
            return super().forward(qkv, all_probs)
        slot_lse = qkv.new_empty(plan.n_windows, plan.s)
        out = qkv.new_zeros(plan.rows, plan.lp, dv)
        slot_weight = slot_lse.new_empty(slot_lse.numel())
        top = torch.full((plan.rows * plan.lp,), -torch.inf, device=qkv.device)  # running max lse per position
        total_weight = torch.zeros(plan.rows * plan.lp, device=qkv.device)  # running sum of exp(lse - top)
        total = plan.slot_row.shape[1]

        def attend(rows: range) -> None:
            first = rows.start * plan.lp  # this part's rows of ``out`` (other parts write the rest)
            part_rows = slice(first, rows.stop * plan.lp)
            rounds = (out.view(-1, dv)[part_rows], top[part_rows], total_weight[part_rows])
            if plan.fused:
                _fused_forward(plan, qkv, rows, all_probs, slot_lse, rounds)
            else:
                for blk in plan.blocks(rows):
                    probs, v = self.block_attention(qkv, blk, all_probs, slot_lse)
                    query_rows = plan.query_slots(plan.slot_row, blk) - first
                    o = torch.bmm(probs, v)  # (blk, s, dv)
                    cpu_kernels.accumulate_rounds_(*rounds, o, slot_lse[blk.start : blk.end], query_rows)
            slots = slice(rows.start * total, rows.stop * total)
            slot_rows = plan.slot_row[rows.start : rows.stop] - first
            cpu_kernels.finish_rounds_(*rounds, slot_lse.view(-1)[slots], slot_rows, slot_weight[slots])

        run_parts([partial(attend, rows) for rows in plan.parts(qkv.device)])
        return out, slot_weight

    def backward_rows(self, inputs: BackwardInputs, rows: range, grad: torch.Tensor) -> None:
        # (the round weights come in as they are: with ``exp_lse`` the forward runs unfused, this fused)
        if self.plan.fused:
            _fused_backward(self.plan, inputs, rows, grad)
        else:
            super().backward_rows(inputs, rows, grad)


def _fused_forward(
    plan: WindowPlan,
    qkv: torch.Tensor,
    rows: range,
    all_probs: torch.Tensor | None,
    slot_lse: torch.Tensor,
    rounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """The forward of batch ``rows``' windows in one kernel call (probabilities into ``all_probs``
    unless it is None); ``rounds``: the part's ``(out, top, total)``, from its first row."""
    part, windows = slice(rows.start, rows.stop), slice(rows.start * plan.n, rows.stop * plan.n)
    cpu_kernels.strict_windows_forward_(
        qkv,
        plan.ext_row[part],
        plan.span_row[part],
        plan.slot_row[part] - rows.start * plan.lp,
        None if all_probs is None else all_probs[windows],
        slot_lse[windows],
        rounds,
        plan.s,
        plan.c,
        self_logit(qkv.dtype, plan.self_value),
        FUSED_CHUNK_WINDOWS,
    )


def _fused_backward(plan: WindowPlan, inputs: BackwardInputs, rows: range, grad: torch.Tensor) -> None:
    """The backward of batch ``rows``' windows in one kernel call, added to ``grad``: the part's
    rows of the gradient, from its first row."""
    part, windows = slice(rows.start, rows.stop), slice(rows.start * plan.n, rows.stop * plan.n)
    first, positions = rows.start * plan.lp, slice(rows.start * plan.lp, rows.stop * plan.lp)
    cpu_kernels.strict_windows_backward_(
        inputs.qkv,
        plan.ext_row[part],
        plan.span_row[part],
        plan.slot_row[part] - first,
        inputs.weight[part],
        first,
        inputs.probs[windows],
        inputs.grad_out[positions],
        inputs.g_dot_out[positions],
        grad,
        plan.s,
        plan.c,
        FUSED_CHUNK_WINDOWS,
    )


def _row_parts(x: torch.Tensor) -> list[slice]:
    """The rows of ``x`` in one piece per CPU worker."""
    return [slice(r.start, r.stop) for r in split_among_workers(x.shape[0], x.device)]
