"""Fused CPU row kernels for LSH attention, compiled from C on first use.

:mod:`reformer.attention.chunked` spent more time in the elementwise passes around its
small matmuls (masks, softmax, log-sum-exp, the softmax backward, gathers and scatter-adds
of rows) than in the matmuls themselves: each torch op reads and writes a whole block.
``kernels.c`` does each of those sequences in one pass per row, and the argmax of the
hash (:mod:`reformer.hashing`) in one pass over the projections. For strict causal windows it
does the matmuls too (:func:`strict_windows_forward_`, :func:`strict_windows_backward_`): at
32 x 96 x 64 the batched matmul spent as long on its per-matrix packing and calls as on the
arithmetic, and each of its results went through memory to the next pass. It is compiled with the system's C
compiler (``$CC``, else ``cc``) for this machine into ``~/.cache/reformer/kernels``
(``$REFORMER_CACHE`` overrides ``~/.cache/reformer``), keyed by the source, the compiler and
the CPU, and loaded with :mod:`ctypes` (whose calls release the GIL, so the CPU worker
threads run them at once). Without a compiler, or with ``REFORMER_CPU_KERNELS=0``, the
chunked path uses its torch ops instead; tests compare the two.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from . import build

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared"]
#: Widest window row (``c + s``) and most key + value features the kernels take (the build
#: passes both to the C source, which sizes its row buffers by them).
MAX_WIDTH, MAX_FEATURES = 4096, 4096


def available(x: torch.Tensor, width: int = 0, features: int = 0) -> bool:
    """Whether the kernels serve tensors like ``x`` (and windows of ``width`` keys with ``features``
    key + value features): fp32 on CPU, ``REFORMER_CPU_KERNELS`` is not ``0``, and the library
    builds and loads here. Their arguments must be contiguous."""
    return x.dtype == torch.float32 and width <= MAX_WIDTH and features <= MAX_FEATURES and serves(x)


def serves(x: torch.Tensor) -> bool:
    """Whether the kernels run for tensors on ``x``'s device, of any dtype they take: on CPU, with
    ``REFORMER_CPU_KERNELS`` not ``0`` and the library built and loaded here, and not while
    ``torch.compile`` traces (the compiled graph uses the torch ops, which Inductor fuses)."""
    if torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu" and os.environ.get("REFORMER_CPU_KERNELS", "1") != "0" and _library() is not None


def bucket_sort(buckets: torch.Tensor, n_ids: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of ``buckets`` ``(..., n)`` (int64 ids in ``[0, n_ids)``) sorted by (id, position),
    as a counting sort: ``perm`` (the position at each slot), ``inv`` (the slot of each position)
    and the sorted ids, all shaped like ``buckets``. Equal to ``(buckets * n + arange(n)).sort()``
    in O(n + n_ids) per row."""
    buckets = buckets.contiguous()
    perm, inv, ids = torch.empty_like(buckets), torch.empty_like(buckets), torch.empty_like(buckets)
    counts = torch.empty(n_ids, dtype=torch.long)
    n = buckets.shape[-1]
    status = _library().reformer_bucket_sort(
        buckets.data_ptr(), buckets.numel() // max(n, 1), n, n_ids, perm.data_ptr(), inv.data_ptr(), ids.data_ptr(),
        counts.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"bucket ids must lie in [0, {n_ids}); got {buckets.min().item()}..{buckets.max().item()}")
    return perm, inv, ids


def pack_qkv_(
    qkv: torch.Tensor, norm: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, scale: float, floor: float
) -> None:
    """Writes ``[qk * scale | qk / max(|qk|, floor) | v]`` into the rows of ``qkv`` ``(n, 2d + dv)``
    from ``qk`` ``(n, d)`` and ``v`` ``(n, dv)``, and the norms ``|qk|`` into ``norm`` ``(n, 1)``."""
    qk, v = qk.contiguous(), v.contiguous()
    (n, d), dv = qk.shape, v.shape[-1]
    _library().reformer_pack_qkv(qk.data_ptr(), v.data_ptr(), qkv.data_ptr(), norm.data_ptr(), n, d, dv, scale, floor)


def fold_qk_grad_(
    grad: torch.Tensor, qkv: torch.Tensor, norm: torch.Tensor, d: int, scale: float, floor: float
) -> None:
    """The gradient of ``qk`` written into the ``q`` columns of ``grad`` ``(n, 2d + dv)`` from its
    ``q`` and ``k`` columns (see ``window_torch.TorchWindows.qk_grad``); ``qkv`` and ``norm`` as
    :func:`pack_qkv_` made them."""
    n, dv = grad.shape[0], grad.shape[1] - 2 * d
    _library().reformer_fold_qk_grad(grad.data_ptr(), qkv.data_ptr(), norm.data_ptr(), n, d, dv, scale, floor)


def strict_softmax(
    dots: torch.Tensor, probs: torch.Tensor, span_row: torch.Tensor, s: int, c: int, self_value: float, exp_lse: bool
) -> torch.Tensor:
    """Strict-causal window weights: ``dots`` ``(blk, s, c + s)`` raw logits, written as weights
    into ``probs`` (may be ``dots``); ``span_row`` ``(blk * s,)`` int64, each query's
    ``span * s + i`` (see ``window_plan.strict_hidden_table``). Returns the log-sum-exp ``(blk, s)``."""
    lse = dots.new_empty(dots.shape[:2])
    span_row = span_row.contiguous()
    _library().reformer_strict_softmax(
        dots.data_ptr(), probs.data_ptr(), lse.data_ptr(), span_row.data_ptr(), dots.shape[0] * s, s, c,
        self_value, int(exp_lse),
    )  # fmt: skip
    return lse


def softmax(dots: torch.Tensor, probs: torch.Tensor, exp_lse: bool) -> torch.Tensor:
    """Weights of masked logits ``dots`` ``(blk, s, w)`` into ``probs``; returns the lse ``(blk, s)``."""
    lse = dots.new_empty(dots.shape[:2])
    _library().reformer_softmax(
        dots.data_ptr(), probs.data_ptr(), lse.data_ptr(), lse.numel(), dots.shape[-1], int(exp_lse)
    )
    return lse


def softmax_backward_(grad: torch.Tensor, probs: torch.Tensor, shift: torch.Tensor, c: int, strict: bool) -> None:
    """``grad`` ``(blk, s, c + s)`` := ``(grad - shift) * probs`` in place (``shift`` ``(blk, s, 1)``),
    and 0 at each query's own key ``c + i`` when ``strict``."""
    shift = shift.contiguous()
    _library().reformer_softmax_backward(
        grad.data_ptr(), probs.data_ptr(), shift.data_ptr(), shift.numel(), grad.shape[1], c, int(strict)
    )


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(r, e)`` at ``rows`` (int64, any shape) -> ``(*rows.shape, e)``: as
    ``index_select``, with the next rows prefetched while one is copied."""
    rows = rows.contiguous()
    out = x.new_empty(*rows.shape, x.shape[-1])
    _library().reformer_gather_rows(x.data_ptr(), rows.data_ptr(), out.data_ptr(), rows.numel(), x.shape[-1])
    return out


def accumulate_rounds_(
    out: torch.Tensor, top: torch.Tensor, total: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor
) -> None:
    """Adds a block's per-slot outputs ``o`` ``(n, dv)`` (log-sum-exps ``lse`` ``(n,)``) to the
    rows ``rows`` ``(n,)`` of ``out`` ``(positions, dv)``, rescaled as the running largest ``lse``
    per position (``top``, from ``-inf``) grows; ``total`` (from 0) sums the weights. After every
    round, :func:`finish_rounds_` normalises: the rounds combined by the softmax of their lse."""
    rows = rows.contiguous()
    _library().reformer_accumulate_rounds(
        out.data_ptr(), top.data_ptr(), total.data_ptr(), o.data_ptr(), lse.data_ptr(), rows.data_ptr(),
        rows.numel(), o.shape[-1],
    )  # fmt: skip


def finish_rounds_(
    out: torch.Tensor,
    top: torch.Tensor,
    total: torch.Tensor,
    slot_lse: torch.Tensor,
    slot_rows: torch.Tensor,
    weight: torch.Tensor,
) -> None:
    """Divides the rows of ``out`` by ``total`` and writes each slot's round weight (the softmax
    of its position's rounds' lse) to ``weight`` (slots ``(k,)`` at positions ``slot_rows``)."""
    slot_rows = slot_rows.contiguous()
    _library().reformer_finish_rounds(
        out.data_ptr(), top.data_ptr(), total.data_ptr(), slot_lse.data_ptr(), slot_rows.data_ptr(),
        weight.data_ptr(), top.numel(), slot_rows.numel(), out.shape[-1],
    )  # fmt: skip


def window_grads_to_rows_(
    grad: torch.Tensor, rows: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, s: int, c: int
) -> None:
    """Adds a backward block's window gradients to ``grad`` ``(r, 2d + dv)`` (``[q | k | v]``
    rows) at the rows ``rows`` ``(nb, m * s + c)`` of its key runs: ``gq`` ``(nb * m, s, d)``
    for the runs' last ``m * s`` rows (the queries), ``gk`` ``(nb * m, c + s, d)`` and ``gv``
    ``(nb * m, c + s, dv)`` for each window's keys (see ``window_torch._add_window_grads``)."""
    rows, nb, d, dv = rows.contiguous(), rows.shape[0], gk.shape[-1], gv.shape[-1]
    m = (rows.shape[1] - c) // s
    _library().reformer_window_grads_to_rows(
        grad.data_ptr(), rows.data_ptr(), gq.data_ptr(), gk.data_ptr(), gv.data_ptr(), nb, m, s, c, d, dv
    )


def window_tiles_fit(s: int, c: int, d: int, dv: int) -> bool:
    """Whether :func:`strict_windows_forward_` and :func:`strict_windows_backward_` take windows of
    ``s`` queries and ``c + s`` keys of ``d`` features with ``dv`` value features (their register
    tiles: 8 rows, 16 columns)."""
    return s % 8 == 0 and (c + s) % 16 == 0 and d % 16 == 0 and dv % 16 == 0


def strict_windows_forward_(
    qkv: torch.Tensor,
    ext_row: torch.Tensor,
    span_row: torch.Tensor,
    query_rows: torch.Tensor,
    probs: torch.Tensor | None,
    lse: torch.Tensor,
    rounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    s: int,
    c: int,
    self_value: float,
    chunk: int,
) -> None:
    """The forward of the strict causal windows of ``nb`` batch rows, fused per window: logits,
    their softmax (as :func:`strict_softmax`) and the outputs added to their positions' rows (as
    :func:`accumulate_rounds_` into ``rounds = (out, top, total)``). ``qkv`` ``(r, 2d + dv)``
    packed rows; ``ext_row`` ``(nb, c + n * s)`` the ``qkv`` row of each slot in ext order;
    ``span_row`` and ``query_rows`` ``(nb, n * s)`` each query slot's strict mask row and its row
    of ``out``. Writes ``probs`` ``(nb * n, s, c + s)`` (unless None) and ``lse`` ``(nb * n * s,)``.
    ``chunk``: windows whose key run is gathered at once."""
    (nb, slots), (out, top, total) = span_row.shape, rounds
    n, dv = slots // s, out.shape[-1]
    d = (qkv.shape[-1] - dv) // 2
    scratch = qkv.new_empty((chunk * s + c) * (2 * d + dv + d) + s * (dv + 2 * (c + s)))
    ext_row, span_row, query_rows = ext_row.contiguous(), span_row.contiguous(), query_rows.contiguous()
    _library().reformer_strict_windows_forward(
        qkv.data_ptr(), ext_row.data_ptr(), span_row.data_ptr(), query_rows.data_ptr(), nb, n, chunk, s, c, d, dv,
        self_value, None if probs is None else probs.data_ptr(), lse.data_ptr(), out.data_ptr(), top.data_ptr(),
        total.data_ptr(), scratch.data_ptr(),
    )  # fmt: skip


def strict_windows_backward_(
    qkv: torch.Tensor,
    ext_row: torch.Tensor,
    span_row: torch.Tensor,
    query_rows: torch.Tensor,
    weight: torch.Tensor,
    first_row: int,
    probs: torch.Tensor,
    grad_out: torch.Tensor,
    g_dot_out: torch.Tensor,
    grad: torch.Tensor,
    s: int,
    c: int,
    chunk: int,
) -> None:
    """The backward of :func:`strict_windows_forward_`'s windows, added to ``grad`` ``(rows, 2d +
    dv)`` at their ``qkv`` rows minus ``first_row``: ``probs`` as the forward wrote them;
    ``grad_out`` ``(rows, dv)`` and ``g_dot_out`` ``(rows,)`` (the output gradient and its product
    with the output, per row of ``query_rows``); ``weight`` ``(nb, n * s)`` each query slot's round
    weight; the rest as for the forward."""
    nb, slots = query_rows.shape
    n, dv, e = slots // s, grad_out.shape[-1], qkv.shape[-1]
    d = (e - dv) // 2
    scratch = qkv.new_empty((chunk * s + c) * (2 * e + dv) + s * (chunk * dv + c + s + 1))
    ext_row, span_row = ext_row.contiguous(), span_row.contiguous()
    query_rows, weight = query_rows.contiguous(), weight.contiguous()
    _library().reformer_strict_windows_backward(
        qkv.data_ptr(), ext_row.data_ptr(), span_row.data_ptr(), query_rows.data_ptr(), weight.data_ptr(), first_row,
        nb, n, chunk, s, c, d, dv, probs.data_ptr(), grad_out.data_ptr(), g_dot_out.data_ptr(), grad.data_ptr(),
        scratch.data_ptr(),
    )  # fmt: skip


def argmax_both_signs(part: torch.Tensor) -> torch.Tensor:
    """``argmax([part, -part], dim=-1)`` (the first index on ties; NaN never chosen) of the
    projections ``part`` ``(..., r)``, whose last dim is contiguous."""
    r = part.shape[-1]
    rows = part.reshape(-1, r)  # a view where the leading dims allow (slices of the last dim do)
    ids = torch.empty(rows.shape[0], dtype=torch.long)
    _library().reformer_argmax_both_signs(rows.data_ptr(), ids.data_ptr(), rows.shape[0], r, rows.stride(0))
    return ids.view(part.shape[:-1])


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    limits = [f"-DMAX_WIDTH={MAX_WIDTH}", f"-DMAX_FEATURES={MAX_FEATURES}"]
    compiler = os.environ.get("CC", "cc")
    fallback = "LSH attention uses torch ops instead of the CPU kernels"
    return build.load(SOURCE, compiler, [*FLAGS, *limits, "-lm"], fallback)
