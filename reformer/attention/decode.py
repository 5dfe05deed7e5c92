"""Incremental decoding state of :class:`LSHSelfAttention` layers.

A prefill (the ordinary parallel forward) stores every position's unit key and value; each
new token then attends through the stored keys, so its output equals what the full forward
on the sequence so far would give it - exactly the same function, evaluated for one query:

* strictly causal LSH heads: in each round the new query sees only the at most
  ``bucket_size`` latest earlier keys of its own bucket (docs/design.md, "Masks"). Those
  positions are kept in a ring per (row, round, bucket), so a step gathers
  ``n_hashes * bucket_size`` keys whatever the context length;
* local heads: the keys of the query's block and the previous one (``2 * window``);
* full-attention heads (``use_full_attn``, or LSH heads of a sequence no longer than
  ``full_attn_thres``): every stored key.

The keys themselves live once per layer (``(b, heads, capacity, dim_head)``, like any KV
cache); the rings hold positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import SELF_ATTN_VALUE, fill_masked_, masked_value, normalize_keys, quarantine_non_finite
from .options import LSHOptions


@dataclass
class LayerCache:
    """Stored keys/values of one attention layer and, for LSH heads, the bucket rings."""

    keys: torch.Tensor  # (b, h, capacity, dh) unit keys of the prefix and the sequence
    values: torch.Tensor  # (b, h, capacity, dh)
    length: int  # positions stored (prefix + sequence)
    n_prefix: int  # memory key/values before the sequence
    dense: bool  # the LSH heads attend densely (always, or while length <= full_attn_thres)
    dense_below: int  # the full_attn_thres the dense decision was made with (-1: always dense)
    rings: torch.Tensor | None  # (rows, n_hashes, n_buckets, c) latest positions per bucket
    counts: torch.Tensor | None  # (rows, n_hashes, n_buckets) positions seen per bucket

    def stale_at(self, length: int) -> bool:
        """True when a sequence of ``length`` positions (prefix included) would no longer be
        attended densely, so everything stored after this layer was computed differently."""
        return self.dense and self.dense_below >= 0 and length > self.dense_below

    def poisoned_newest(self) -> torch.Tensor:
        """``(b, h, 1)`` True where the newest position's key or value was not finite (its key
        is stored as NaN): its output is NaN, as in the parallel forward."""
        return self.keys[:, :, self.length - 1].isnan().any(-1, keepdim=True)

    def append(self, qk: torch.Tensor, value: torch.Tensor) -> None:
        """Store one position's ``(b, h, 1, dh)`` query/key (as a unit key) and value."""
        if self.length == self.keys.shape[2]:  # full: double the capacity
            self.keys = torch.cat([self.keys, torch.empty_like(self.keys)], dim=2)
            self.values = torch.cat([self.values, torch.empty_like(self.values)], dim=2)
        qk, value, _ = quarantine_non_finite(qk, value)  # (see poisoned_newest)
        self.keys[:, :, self.length : self.length + 1] = normalize_keys(qk)
        self.values[:, :, self.length : self.length + 1] = value
        self.length += 1


def prefill_cache(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    n_prefix: int,
    capacity: int,
    dense: bool,
    dense_below: int,
    buckets: torch.Tensor | None,
    n_buckets: int,
    bucket_size: int,
) -> LayerCache:
    """State after a parallel forward on ``qk``/``v`` ``(b, h, L, dh)`` (queries/keys after any
    rotary rotation). ``buckets`` ``(rows, n_hashes, L)`` of the LSH heads' rows, None when
    they attended densely; ``capacity``: positions to allocate room for."""
    b, h, length, dh = qk.shape
    keys = qk.new_empty(b, h, max(capacity, length), dh)
    values = v.new_empty(b, h, max(capacity, length), v.shape[-1])
    qk, v, _ = quarantine_non_finite(qk, v)  # (as the parallel paths do)
    keys[:, :, :length] = normalize_keys(qk)
    values[:, :, :length] = v
    rings = counts = None
    if buckets is not None:
        rings, counts = _bucket_rings(buckets, n_buckets, bucket_size)
    return LayerCache(keys, values, length, n_prefix, dense, dense_below, rings, counts)


def _bucket_rings(buckets: torch.Tensor, n_buckets: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rings of the latest ``c`` positions of every bucket: position ``p`` that is the ``k``-th of
    its bucket sits in slot ``k % c`` (so the next arrival overwrites the oldest)."""
    rows, hs, length = buckets.shape
    device = buckets.device
    order = torch.arange(length, device=device)
    sorted_keys, perm = (buckets * length + order).sort(dim=-1)  # (rows, hs, L) by (bucket, position)
    sorted_buckets = sorted_keys // length
    first = torch.ones_like(sorted_buckets, dtype=torch.bool)
    first[..., 1:] = sorted_buckets[..., 1:] != sorted_buckets[..., :-1]
    rank = order - torch.where(first, order, 0).cummax(dim=-1).values  # k: index within its bucket
    counts = torch.zeros(rows, hs, n_buckets, dtype=torch.long, device=device)
    counts.scatter_add_(-1, buckets, torch.ones_like(buckets))
    keep = rank >= counts.gather(-1, sorted_buckets) - c  # the latest c of each bucket
    r, hh, _ = torch.nonzero(keep, as_tuple=True)
    rings = torch.zeros(rows, hs, n_buckets, c, dtype=torch.long, device=device)
    rings[r, hh, sorted_buckets[keep], rank[keep] % c] = perm[keep]
    return rings, counts


def _attend(
    logits: torch.Tensor, valid: torch.Tensor | None, values: torch.Tensor, self_value: float = SELF_ATTN_VALUE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of ``logits`` ``(..., n)`` whose last entry is the query's own
    key (logit ``self_value``, as in the parallel paths); ``values`` ``(..., n, dv)``.
    Returns the output ``(..., dv)`` and the log-sum-exp ``(...)``."""
    if valid is not None:
        logits = logits.masked_fill(~valid, masked_value(logits.dtype))
    fill_masked_(logits[..., -1:], None, torch.ones_like(logits[..., -1:], dtype=torch.bool), self_value)
    probs = torch.softmax(logits, dim=-1)
    return (probs[..., None, :] @ values)[..., 0, :], torch.logsumexp(logits, dim=-1)


def dense_step(state: LayerCache, q: torch.Tensor, heads: slice) -> torch.Tensor:
    """Causal dense attention of the newest position (already stored) over every stored one.
    ``q`` ``(b, hs, dh)`` -> ``(b, hs, dh)``."""
    keys = state.keys[:, heads, : state.length]  # (b, hs, L, dh)
    values = state.values[:, heads, : state.length]
    logits = (keys @ q[..., None])[..., 0] * q.shape[-1] ** -0.5  # (b, hs, L)
    return _attend(logits, None, values)[0]


def local_step(state: LayerCache, q: torch.Tensor, heads: slice, window: int) -> torch.Tensor:
    """Causal local attention of the newest position over its block and the previous one
    (blocks of ``window`` sequence positions; the prefix is not seen). ``q`` ``(b, hs, dh)``."""
    pos = state.length - 1 - state.n_prefix  # sequence position of the query
    start = state.n_prefix + max(0, (pos // window - 1) * window)
    keys = state.keys[:, heads, start : state.length]  # (b, hs, <= 2w, dh)
    values = state.values[:, heads, start : state.length]
    logits = (keys @ q[..., None])[..., 0] * q.shape[-1] ** -0.5
    return _attend(logits, None, values)[0]


def lsh_step(
    state: LayerCache,
    q: torch.Tensor,
    buckets: torch.Tensor,
    heads: slice,
    options: LSHOptions,
) -> torch.Tensor:
    """Strictly causal LSH attention of the newest position (already stored) in each round,
    then the rounds combined by their log-sum-exp; the rings are updated after. Of
    ``options``, ``allow_duplicate_attention`` and ``self_attn_value`` are read.

    ``q`` ``(b, hs, dh)`` and ``buckets`` ``(b * hs, n_hashes)`` of the LSH heads. Returns
    ``(b, hs, dh)``.
    """
    b, hs, dh = q.shape
    rows, n_hashes = buckets.shape
    c = state.rings.shape[-1]
    device = q.device
    row = torch.arange(rows, device=device)[:, None]  # (rows, 1)
    rnd = torch.arange(n_hashes, device=device)[None, :]  # (1, n_hashes)
    ring = state.rings[row, rnd, buckets]  # (rows, n_hashes, c) positions
    count = state.counts[row, rnd, buckets]  # (rows, n_hashes)
    new_pos = state.length - 1
    positions = torch.cat([ring, ring.new_full((rows, n_hashes, 1), new_pos)], dim=-1)  # (rows, n_hashes, c+1)
    valid = torch.arange(c + 1, device=device) < count[..., None]  # filled ring slots
    valid[..., -1] = True  # the query's own key
    # Row (batch i, head j) reads state.keys[i, heads.start + j]: gather whole key rows of the
    # flattened store (index_select copies rows; it is much faster than 3-tensor indexing).
    n_heads, capacity = state.keys.shape[1], state.keys.shape[2]
    store_row = (row // hs) * n_heads + row % hs + (heads.start or 0)  # (rows, 1)
    flat = (store_row[..., None] * capacity + positions).flatten()
    keys = state.keys.view(-1, dh).index_select(0, flat).view(rows, n_hashes, c + 1, dh)
    values = state.values.view(-1, state.values.shape[-1]).index_select(0, flat).view(rows, n_hashes, c + 1, -1)
    qr = q.reshape(rows, 1, dh, 1) * dh**-0.5
    logits = (keys @ qr)[..., 0]  # (rows, n_hashes, c+1)
    if not options.allow_duplicate_attention:  # -log(number of rounds in which each key is seen)
        same = positions[:, :, :, None, None] == positions[:, None, None, :, :]
        seen = (same & valid[:, None, None, :, :]).sum(dim=(-1, -2))  # (rows, n_hashes, c+1)
        logits = logits - seen.clamp_min(1).to(logits.dtype).log()
    out, lse = _attend(logits, valid, values, options.self_attn_value)  # (rows, n_hashes, dh), (rows, n_hashes)
    if n_hashes > 1:
        acc = torch.promote_types(lse.dtype, torch.float32)
        weights = torch.softmax(lse.to(acc), dim=1).to(out.dtype)
        out = (out * weights[..., None]).sum(dim=1)
    else:
        out = out[:, 0]
    state.rings[row, rnd, buckets, count % c] = new_pos
    state.counts[row, rnd, buckets] += 1
    return out.view(b, hs, dh)


class DecodingCache:
    """Decoding state of a whole model: one :class:`LayerCache` per attention call, in the
    order the forward makes them (so weight-tied layers at different depths get their own).

    Pass it as ``cache=`` to :meth:`reformer.ReformerLM.forward`: the first call (the prompt)
    fills it, each later call extends it. ``capacity``: positions to allocate room for
    (default: as many as the prompt; storage doubles when it runs out)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.layers: list[LayerCache] = []
        self.seq_len = 0  # sequence positions decoded so far
        self.tokens: torch.Tensor | None = None  # (b, seq_len) token history, kept by ReformerLM
        self._cursor = 0

    @property
    def empty(self) -> bool:
        return not self.layers

    def begin(self) -> None:
        """Start a forward over the layers."""
        self._cursor = 0

    def next_layer(self) -> LayerCache:
        state = self.layers[self._cursor]
        self._cursor += 1
        return state

    def stale_at(self, seq_len: int) -> bool:
        """True when some layer would attend differently at ``seq_len`` sequence positions."""
        return any(s.stale_at(s.n_prefix + seq_len) for s in self.layers)

    def clear(self) -> None:
        self.layers.clear()
        self.seq_len = 0
        self.tokens = None
