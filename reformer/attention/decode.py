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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import SELF_ATTN_VALUE, fill_masked_, normalize_keys, quarantine_non_finite
from .options import LSHOptions


@dataclass
class LayerCache:
    """Stored keys/values of one attention layer and, for LSH heads, the bucket rings.

    Every quantity a decode step reads is a tensor of fixed shape (``length`` too), so a
    compiled step serves every position; the host decides only when to grow the storage
    (:meth:`reserve`) or to start again (:meth:`stale_at`)."""

    keys: torch.Tensor  # (b, h, capacity, dh) unit keys of the prefix and the sequence (0 past length)
    values: torch.Tensor  # (b, h, capacity, dh)
    length: torch.Tensor  # () int64: positions stored (prefix + sequence)
    n_prefix: int  # memory key/values before the sequence
    dense: bool  # the LSH heads attend densely (always, or while length <= full_attn_thres)
    dense_below: int  # the full_attn_thres the dense decision was made with (-1: always dense)
    rings: torch.Tensor | None  # (rows, n_hashes, n_buckets, c) latest positions per bucket
    counts: torch.Tensor | None  # (rows, n_hashes, n_buckets) positions seen per bucket

    def stale_at(self, length: int) -> bool:
        """True when a sequence of ``length`` positions (prefix included) would no longer be
        attended densely, so everything stored after this layer was computed differently."""
        return self.dense and self.dense_below >= 0 and length > self.dense_below

    def reserve(self, length: int) -> None:
        """Room for ``length`` positions (prefix included): the storage doubles until it fits."""
        capacity = self.keys.shape[2]
        while capacity < length:
            capacity *= 2
        if capacity > self.keys.shape[2]:
            grow = capacity - self.keys.shape[2]
            self.keys = F.pad(self.keys, (0, 0, 0, grow))
            self.values = F.pad(self.values, (0, 0, 0, grow))

    def poisoned_newest(self) -> torch.Tensor:
        """``(b, h, 1)`` True where the newest position's key or value was not finite (its key
        is stored as NaN): its output is NaN, as in the parallel forward."""
        return self.keys.index_select(2, (self.length - 1).view(1)).isnan().any(-1)

    def append(self, qk: torch.Tensor, value: torch.Tensor) -> None:
        """Store one position's ``(b, h, 1, dh)`` query/key (as a unit key) and value; the
        room is there (:meth:`reserve`)."""
        qk, value, _ = quarantine_non_finite(qk, value)  # (see poisoned_newest)
        at = self.length.view(1)
        self.keys.index_copy_(2, at, normalize_keys(qk))
        self.values.index_copy_(2, at, value)
        self.length.add_(1)


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
    keys = qk.new_zeros(b, h, max(capacity, length), dh)  # (zeros: hidden slots weigh 0 * a finite value)
    values = v.new_zeros(b, h, max(capacity, length), v.shape[-1])
    qk, v, _ = quarantine_non_finite(qk, v)  # (as the parallel paths do)
    keys[:, :, :length] = normalize_keys(qk)
    values[:, :, :length] = v
    rings = counts = None
    if buckets is not None:
        rings, counts = _bucket_rings(buckets, n_buckets, bucket_size)
    return LayerCache(keys, values, torch.tensor(length, device=qk.device), n_prefix, dense, dense_below, rings, counts)


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
    logits: torch.Tensor,
    hidden: torch.Tensor,
    is_self: torch.Tensor,
    values: torch.Tensor,
    self_value: float = SELF_ATTN_VALUE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim of ``logits`` ``(..., n)`` without the ``hidden`` keys and with
    the query's own key (``is_self``) at logit ``self_value``, as in the parallel paths;
    ``values`` ``(..., n, dv)``. Returns the output ``(..., dv)`` and the log-sum-exp ``(...)``."""
    logits = fill_masked_(logits, hidden, is_self, self_value)
    probs = torch.softmax(logits, dim=-1)
    return (probs[..., None, :] @ values)[..., 0, :], torch.logsumexp(logits, dim=-1)


def dense_step(state: LayerCache, q: torch.Tensor, heads: slice) -> torch.Tensor:
    """Causal dense attention of the newest position (already stored) over every stored one,
    computed over the whole fixed-size storage with the slots past ``length`` hidden.
    ``q`` ``(b, hs, dh)`` -> ``(b, hs, dh)``."""
    keys = state.keys[:, heads]  # (b, hs, capacity, dh)
    logits = (keys @ q[..., None])[..., 0] * q.shape[-1] ** -0.5  # (b, hs, capacity)
    slot = torch.arange(keys.shape[2], device=q.device)
    newest = state.length - 1
    return _attend(logits, slot > newest, slot == newest, state.values[:, heads])[0]


def local_step(state: LayerCache, q: torch.Tensor, heads: slice, window: int) -> torch.Tensor:
    """Causal local attention of the newest position over its block and the previous one
    (blocks of ``window`` sequence positions; the prefix is not seen): a fixed ``2 window``
    slots gathered, those past the newest hidden. ``q`` ``(b, hs, dh)``."""
    newest = state.length - 1
    pos = newest - state.n_prefix  # sequence position of the query
    start = state.n_prefix + ((pos // window - 1) * window).clamp_min(0)
    slot = start + torch.arange(2 * window, device=q.device)  # (2w,)
    index = slot.clamp_max(state.keys.shape[2] - 1)  # (slots past the storage are hidden anyway)
    keys = state.keys[:, heads].index_select(2, index)  # (b, hs, 2w, dh)
    values = state.values[:, heads].index_select(2, index)
    logits = (keys @ q[..., None])[..., 0] * q.shape[-1] ** -0.5
    return _attend(logits, slot > newest, slot == newest, values)[0]


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
    positions = torch.cat([ring, new_pos.expand(rows, n_hashes, 1)], dim=-1)  # (rows, n_hashes, c+1)
    slot = torch.arange(c + 1, device=device)
    is_self = slot == c  # the query's own key, last
    valid = (slot < count[..., None]) | is_self  # filled ring slots and the own key
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
    out, lse = _attend(logits, ~valid, is_self, values, options.self_attn_value)  # (rows, n_hashes, dh), (rows, n_h)
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
    (default: as many as the prompt; storage doubles when it runs out). ``compile``: run each
    decode step through ``torch.compile`` (True: Inductor, or a ``torch.compile`` backend, its
    name or the callable): one graph serves every position while the storage keeps its size."""

    def __init__(self, capacity: int | None = None, compile: bool | str | Callable = False):
        if not isinstance(compile, (bool, str)) and not callable(compile):
            raise ValueError(f"compile must be True, False or a torch.compile backend, got {compile!r}")
        self.capacity = capacity
        self.compile = compile
        self.layers: list[LayerCache] = []
        self.seq_len = 0  # sequence positions decoded so far (the host's count, for its checks)
        self.position: torch.Tensor | None = None  # () int64 seq_len on the device: what a step reads
        self.tokens: torch.Tensor | None = None  # (b, seq_len) token history, kept by ReformerLM
        self._cursor = 0

    @property
    def empty(self) -> bool:
        return not self.layers

    @property
    def prefilled(self) -> bool:
        """True once the prompt has gone through: each layer's state exists."""
        return self.position is not None

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

    def reserve(self, seq_len: int) -> None:
        """Room in every layer for ``seq_len`` sequence positions."""
        for state in self.layers:
            state.reserve(state.n_prefix + seq_len)

    def advance(self, n: int, device: torch.device) -> None:
        """Count ``n`` more positions, after a forward through the layers."""
        self.seq_len += n
        if self.position is None:
            self.position = torch.tensor(self.seq_len, device=device)
        else:
            self.position.add_(n)

    def clear(self) -> None:
        self.layers.clear()
        self.seq_len = 0
        self.position = None
        self.tokens = None
