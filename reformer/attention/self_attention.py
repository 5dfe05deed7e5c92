"""LSHSelfAttention: the attention layer of a Reformer block, on ``(batch, len, dim)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..checks import (
    check_attn_mask,
    check_extra_keys,
    check_features,
    check_int,
    check_mask,
    check_prob,
    resolve_dim_head,
)
from ..hashing import BucketSpec, total_buckets
from ..positions import apply_rotary, rotary_angles
from .common import SELF_ATTN_VALUE
from .decode import DecodingCache, LayerCache, dense_step, local_step, lsh_step, prefill_cache
from .full import allowed_pairs, full_qk_attention
from .local import local_attention_chunked
from .lsh import LSHAttention
from .options import LSHOptions, layer_options


class LSHSelfAttention(nn.Module):
    """Multi-head shared-QK self-attention with LSH (``reformer_pytorch`` names and defaults).

    Extra key/values - ``num_mem_kv`` learned memory slots and the ``keys=`` given at call
    time (e.g. encoder outputs) - are placed *before* the sequence, so every query may
    attend to them (in LSH mode: when they share its bucket), causal or not.

    Args beyond :class:`LSHAttention`'s:
        dim: model width. heads: attention heads. dim_head: per-head width (default
            ``dim // heads``).
        attn_chunks: split the ``batch * heads`` rows into this many chunks (memory).
        num_mem_kv: learned memory key/values prepended to every sequence.
        n_local_attn_heads: this many heads use local attention (blocks of
            ``2 * bucket_size``, looking one block back, and one forward when not causal).
        use_full_attn: always use dense shared-QK attention (for comparison).
        full_attn_thres: use dense attention when ``len + memory + keys`` is at most this
            (default ``bucket_size``, where classic LSH sees everything anyway; 0 - never - for
            strict causal attention, whose outputs must not depend on the length).
        post_attn_dropout: dropout on the layer output. dropout: on the attention weights.
        rotary_emb: rotate the sequence's shared query/key vectors by position (RoPE).
        qk_logit_scale: scale of the logits ``q . k / |k|`` (default ``dim_head ** -0.5``).
        out_bias: bias in the output projection.
        one_value_head: one value projection (``dim_head`` wide) shared by every head.
        rehash_each_round, drop_for_hash_rate, pad_bucket, n_buckets_first_major, self_value, exp_lse,
            backend, options: as in :class:`LSHAttention` (a model passes ``options``, built once
            from its config; the LSH keywords then keep their defaults).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        bucket_size: int = 64,
        n_hashes: int = 8,
        causal: bool = False,
        dim_head: int | None = None,
        attn_chunks: int = 1,
        random_rotations_per_head: bool = False,
        attend_across_buckets: bool = True,
        allow_duplicate_attention: bool = True,
        num_mem_kv: int = 0,
        use_full_attn: bool = False,
        full_attn_thres: int | None = None,
        return_attn: bool = False,
        post_attn_dropout: float = 0.0,
        dropout: float = 0.0,
        n_local_attn_heads: int = 0,
        one_value_head: bool = False,
        *,
        rehash_each_round: bool = True,
        drop_for_hash_rate: float = 0.0,
        strict_causal: bool = True,
        n_buckets: BucketSpec | None = None,
        max_seq_len: int | None = None,
        hash_seed: int | None = None,
        rotary_emb: bool = False,
        qk_logit_scale: float | None = None,
        out_bias: bool = True,
        pad_bucket: bool = False,
        n_buckets_first_major: bool = True,
        self_value: float = SELF_ATTN_VALUE,
        exp_lse: bool = False,
        backend: str = "auto",
        options: LSHOptions | None = None,
    ):
        options = layer_options(locals(), options)  # (first: locals() holds just the arguments)
        super().__init__()
        dim_head = resolve_dim_head(dim, heads, dim_head)
        check_int("n_local_attn_heads", n_local_attn_heads, 0)
        if n_local_attn_heads > heads:
            raise ValueError(f"n_local_attn_heads must be in [0, heads={heads}], got {n_local_attn_heads}")
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.attn_chunks = check_int("attn_chunks", attn_chunks, 1)
        self.num_mem_kv = check_int("num_mem_kv", num_mem_kv, 0)
        self.n_local_attn_heads = n_local_attn_heads
        self.causal = options.causal
        self.use_full_attn = bool(use_full_attn)
        if full_attn_thres is None:
            # Dense attention equals classic LSH when everything fits in one chunk, but not strict
            # causal LSH; switching there would make a prefix's outputs depend on the length.
            full_attn_thres = 0 if options.causal and options.strict_causal else options.bucket_size
        self.full_attn_thres = check_int("full_attn_thres", full_attn_thres, 0)
        self.attn_dropout = options.lsh_dropout
        self.rotary_emb = bool(rotary_emb)
        if self.rotary_emb and dim_head % 2:
            raise ValueError(f"rotary_emb needs an even dim_head, got {dim_head}")

        inner = dim_head * heads
        self.toqk = nn.Linear(dim, inner, bias=False)
        self.value_heads = 1 if one_value_head else heads  # heads with their own values
        self.tov = nn.Linear(dim, dim_head * self.value_heads, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)
        # Keys are unit vectors and hashing is scale-invariant, so scaling the shared qk
        # vectors scales only the logits: from the kernels' dim_head ** -0.5 to the one asked for.
        self.qk_rescale = None if qk_logit_scale is None else qk_logit_scale * dim_head**0.5
        self.post_attn_dropout = nn.Dropout(check_prob("post_attn_dropout", post_attn_dropout))
        self.mem_kv = nn.Parameter(torch.randn(1, num_mem_kv, dim)) if num_mem_kv > 0 else None
        self.lsh_attn = LSHAttention(heads=heads - n_local_attn_heads or None, options=options)
        #: Optional ``callback(attn, buckets)`` called after each forward (used by Recorder).
        self.callback: Callable[[torch.Tensor | None, torch.Tensor], None] | None = None

    def attends_densely(self, length: int) -> bool:
        """Whether the LSH heads use dense attention for ``length`` positions (prefix included)."""
        return self.use_full_attn or length <= self.full_attn_thres

    def cache_unsupported_reason(self) -> str | None:
        """Why cached decoding could not equal the full forward for this layer, or None."""
        if not self.causal:
            return "the attention is not causal (later tokens change earlier outputs)"
        if self.n_local_attn_heads == self.heads or self.use_full_attn:
            return None
        if not self.lsh_attn.strict_causal:
            return "strict_causal=False: chunk boundaries, and so earlier outputs, move as the sequence grows"
        if self.lsh_attn.n_buckets is None:
            return "n_buckets depends on the input length (give n_buckets or max_seq_len)"
        return None

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor | None = None,
        input_mask: torch.Tensor | None = None,
        input_attn_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        pos_emb: torch.Tensor | None = None,
        cache: DecodingCache | None = None,
    ) -> torch.Tensor:
        """``x`` ``(b, t, dim)``; ``keys`` ``(b, c, dim)``; ``input_mask`` ``(b, t)`` and
        ``context_mask`` ``(b, c)`` bool, True = real. Returns ``(b, t, dim)``.

        ``reformer_pytorch``'s options, with its semantics: ``input_attn_mask`` ``(b, n, m)``
        bool, which query-key pairs may attend, indexed as there (the sequence, then the memory
        key/values, then ``keys``; pairs beyond ``n``, ``m`` allowed), on the LSH heads and dense
        attention (local heads ignore it, as there).
        ``pos_emb`` ``(1, n, dim_head)``: see :meth:`LSHAttention.forward`; as there, it turns
        the LSH heads' vectors of the first ``n`` positions (not local heads, not dense attention).

        ``cache``: incremental decoding (see :mod:`reformer.attention.decode`). Until it is
        ``prefilled`` this is the prefill, which also stores this layer's keys; after that
        ``x`` is the next position ``(b, 1, dim)``."""
        check_features("x", x, self.dim)
        if cache is not None:
            extras = (keys, input_mask, input_attn_mask, context_mask, pos_emb)
            if any(extra is not None for extra in extras):
                raise ValueError("cached decoding takes no keys, input_mask, input_attn_mask, context_mask or pos_emb")
            if cache.prefilled:  # this layer's state exists, so the prefill below accepted it
                return self._decode_step(x, cache.next_layer())
            reason = self.cache_unsupported_reason()
            if reason is not None:
                raise ValueError(f"cached decoding is not exact for this layer: {reason}")
        b, t, _ = x.shape
        check_mask("input_mask", input_mask, (b, t))
        prefix = []
        if self.mem_kv is not None:
            prefix.append(self.mem_kv.expand(b, -1, -1).to(x.dtype))
        n_ctx = check_extra_keys(keys, context_mask, b, self.dim)
        if keys is not None:
            prefix.append(keys.to(x.dtype))
        n_prefix = sum(p.shape[1] for p in prefix)
        seq = torch.cat([*prefix, x], dim=1) if prefix else x
        length = n_prefix + t
        check_attn_mask(input_attn_mask, b, length)

        mask = None
        if input_mask is not None or context_mask is not None:
            mask = torch.ones(b, length, dtype=torch.bool, device=x.device)
            if context_mask is not None:
                mask[:, n_prefix - n_ctx : n_prefix] = context_mask
            if input_mask is not None:
                mask[:, n_prefix:] = input_mask

        h, dh = self.heads, self.dim_head

        def split_heads(y: torch.Tensor) -> torch.Tensor:  # (b, L, h*dh) -> (b, h, L, dh)
            return y.view(b, length, h, dh).transpose(1, 2)

        qk, v = split_heads(self.toqk(seq)), split_heads(self._values(seq))
        if self.qk_rescale is not None:
            qk = qk * self.qk_rescale
        if self.rotary_emb:  # rotate the sequence's queries/keys by position; the prefix is unrotated
            angles = rotary_angles(t, dh, x.device)
            qk = torch.cat([qk[:, :, :n_prefix], apply_rotary(qk[:, :, n_prefix:], angles)], dim=2)
        lh = self.n_local_attn_heads
        parts = []
        buckets = None
        if lh:
            local = local_attention_chunked(
                qk[:, :lh, n_prefix:].reshape(b * lh, t, dh),
                v[:, :lh, n_prefix:].reshape(b * lh, t, dh),
                window_size=2 * self.lsh_attn.bucket_size,
                causal=self.causal,
                look_forward=0 if self.causal else 1,
                key_mask=None if input_mask is None else input_mask.repeat_interleave(lh, dim=0),
                dropout=self.attn_dropout,
                training=self.training,
            )
            parts.append(local.view(b, lh, t, dh))
        if lh < h:
            rows = b * (h - lh)
            # (no slice when every head is LSH: autograd would zero-fill and copy its gradient)
            lqk = (qk[:, lh:] if lh else qk).reshape(rows, length, dh)
            lv = (v[:, lh:] if lh else v).reshape(rows, length, dh)
            row_mask = None if mask is None else mask.repeat_interleave(h - lh, dim=0)
            pairs = None
            if input_attn_mask is not None:  # (the peer's layout is ours rolled: the sequence first)
                pairs = allowed_pairs(input_attn_mask, length, length, False, x.device)
                pairs = pairs.roll((n_prefix, n_prefix), dims=(1, 2)).repeat_interleave(h - lh, dim=0)
            if self.attends_densely(length):
                out, attn = full_qk_attention(
                    lqk,
                    lv,
                    causal=self.causal,
                    key_mask=row_mask,
                    dropout=self.attn_dropout,
                    training=self.training,
                    need_weights=self.callback is not None or self.lsh_attn.return_attn,
                    allowed=pairs,
                )
            else:
                out, attn, buckets = self.lsh_attn(
                    lqk,
                    lv,
                    input_mask=row_mask,
                    input_attn_mask=pairs,
                    pos_emb=None if pos_emb is None else _unturned_prefix(pos_emb, n_prefix),
                    chunks=self.attn_chunks,
                )
            if self.callback is not None:  # per (batch, head): attn (b, h, L, L), buckets (b, h, n_hashes, L)
                self.callback(
                    None if attn is None else attn.view(b, h - lh, length, length),
                    buckets.view(b, h - lh, *buckets.shape[1:])
                    if buckets is not None
                    else torch.empty(0, dtype=torch.long, device=x.device),
                )
            out = out.view(b, h - lh, length, dh)
            parts.append(out[:, :, n_prefix:] if n_prefix else out)
        if cache is not None:
            cache.layers.append(
                prefill_cache(
                    qk,
                    v,
                    n_prefix=n_prefix,
                    capacity=n_prefix + (cache.capacity or t),
                    dense=lh < h and self.attends_densely(length),
                    dense_below=-1 if self.use_full_attn else self.full_attn_thres,
                    buckets=buckets,
                    n_buckets=0 if buckets is None else total_buckets(self.lsh_attn.bucket_spec(length)),
                    bucket_size=self.lsh_attn.bucket_size,
                )
            )
        return self._merge_heads(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        """Values of every head ``(b, L, heads * dim_head)``; with ``one_value_head`` the one
        head's values repeated."""
        v = self.tov(x)
        return v if self.value_heads == self.heads else v.repeat(1, 1, self.heads)

    def _merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """``(b, h, t, dh)`` per-head outputs -> the layer output ``(b, t, dim)``."""
        b, h, t, dh = out.shape
        out = out.transpose(1, 2).reshape(b, t, h * dh)
        return self.post_attn_dropout(self.to_out(out))

    def _decode_step(self, x: torch.Tensor, state: LayerCache) -> torch.Tensor:
        """Output ``(b, 1, dim)`` of the next position ``x`` ``(b, 1, dim)``, given the stored ones."""
        b, t, _ = x.shape
        if t != 1:
            raise ValueError(f"after the prefill, cached decoding takes one position at a time, got {t}")
        h, dh, lh = self.heads, self.dim_head, self.n_local_attn_heads
        qk = self.toqk(x).view(b, 1, h, dh).transpose(1, 2)  # (b, h, 1, dh)
        v = self._values(x).view(b, 1, h, dh).transpose(1, 2)
        if self.qk_rescale is not None:
            qk = qk * self.qk_rescale
        if self.rotary_emb:
            qk = apply_rotary(qk, rotary_angles(1, dh, x.device, offset=state.length - state.n_prefix))
        state.append(qk, v)
        q = qk[:, :, 0]  # (b, h, dh)
        parts = []
        if lh:
            parts.append(local_step(state, q[:, :lh], slice(0, lh), 2 * self.lsh_attn.bucket_size))
        if lh < h:
            if state.dense:
                parts.append(dense_step(state, q[:, lh:], slice(lh, h)))
            else:
                buckets = self.lsh_attn.hash(q[:, lh:].reshape(b * (h - lh), 1, dh))[..., 0]  # (rows, n_hashes)
                parts.append(lsh_step(state, q[:, lh:], buckets, slice(lh, h), self.lsh_attn.options))
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (b, h, dh)
        out = out.masked_fill(state.poisoned_newest(), torch.nan)
        return self._merge_heads(out[:, :, None])


def _unturned_prefix(pos_emb: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """``pos_emb`` ``(1, n, d)`` (``[sin | cos]`` halves) of the sequence, preceded by angle 0
    for the ``n_prefix`` memory/context positions in front of it: ``(1, n_prefix + n, d)``."""
    if n_prefix == 0:
        return pos_emb
    half = pos_emb.shape[-1] // 2
    zero_angle = torch.cat([pos_emb.new_zeros(1, n_prefix, half), pos_emb.new_ones(1, n_prefix, half)], dim=-1)
    return torch.cat([zero_angle, pos_emb], dim=1)
