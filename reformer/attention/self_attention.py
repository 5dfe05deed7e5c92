"""LSHSelfAttention: the attention layer of a Reformer block, on ``(batch, len, dim)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..hashing import BucketSpec
from ..positions import apply_rotary, rotary_angles
from .common import SELF_ATTN_VALUE, check_features, check_int, check_mask, check_prob, resolve_dim_head
from .full import full_qk_attention
from .local import local_attention_chunked
from .lsh import LSHAttention


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
        pad_bucket, n_buckets_first_major, self_value, exp_lse: as in :class:`LSHAttention`.
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
        *,
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
    ):
        super().__init__()
        dim_head = resolve_dim_head(dim, heads, dim_head)
        check_int("n_local_attn_heads", n_local_attn_heads, 0)
        if n_local_attn_heads > heads:
            raise ValueError(f"n_local_attn_heads must be in [0, heads={heads}], got {n_local_attn_heads}")
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.attn_chunks = check_int("attn_chunks", attn_chunks, 1)
        self.num_mem_kv = check_int("num_mem_kv", num_mem_kv, 0)
        self.n_local_attn_heads = n_local_attn_heads
        self.causal = bool(causal)
        self.use_full_attn = bool(use_full_attn)
        if full_attn_thres is None:
            # Dense attention equals classic LSH when everything fits in one chunk, but not strict
            # causal LSH; switching there would make a prefix's outputs depend on the length.
            full_attn_thres = 0 if causal and strict_causal else bucket_size
        self.full_attn_thres = check_int("full_attn_thres", full_attn_thres, 0)
        self.attn_dropout = check_prob("dropout", dropout)
        self.rotary_emb = bool(rotary_emb)
        if self.rotary_emb and dim_head % 2:
            raise ValueError(f"rotary_emb needs an even dim_head, got {dim_head}")

        inner = dim_head * heads
        self.toqk = nn.Linear(dim, inner, bias=False)
        self.tov = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)
        # Keys are unit vectors and hashing is scale-invariant, so scaling the shared qk
        # vectors scales only the logits: from the kernels' dim_head ** -0.5 to the one asked for.
        self.qk_rescale = None if qk_logit_scale is None else qk_logit_scale * dim_head**0.5
        self.post_attn_dropout = nn.Dropout(check_prob("post_attn_dropout", post_attn_dropout))
        self.mem_kv = nn.Parameter(torch.randn(1, num_mem_kv, dim)) if num_mem_kv > 0 else None
        self.lsh_attn = LSHAttention(
            dropout=dropout,
            bucket_size=bucket_size,
            n_hashes=n_hashes,
            causal=causal,
            allow_duplicate_attention=allow_duplicate_attention,
            attend_across_buckets=attend_across_buckets,
            random_rotations_per_head=random_rotations_per_head,
            return_attn=return_attn,
            strict_causal=strict_causal,
            n_buckets=n_buckets,
            max_seq_len=max_seq_len,
            heads=heads - n_local_attn_heads or None,
            hash_seed=hash_seed,
            pad_bucket=pad_bucket,
            n_buckets_first_major=n_buckets_first_major,
            self_value=self_value,
            exp_lse=exp_lse,
        )
        #: Optional ``callback(attn, buckets)`` called after each forward (used by Recorder).
        self.callback: Callable[[torch.Tensor | None, torch.Tensor], None] | None = None

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor | None = None,
        input_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``(b, t, dim)``; ``keys`` ``(b, c, dim)``; ``input_mask`` ``(b, t)`` and
        ``context_mask`` ``(b, c)`` bool, True = real. Returns ``(b, t, dim)``."""
        check_features("x", x, self.dim)
        b, t, _ = x.shape
        check_mask("input_mask", input_mask, (b, t))
        prefix = []
        if self.mem_kv is not None:
            prefix.append(self.mem_kv.expand(b, -1, -1).to(x.dtype))
        if keys is not None:
            if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.shape[0] != b or keys.shape[2] != self.dim:
                got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
                raise ValueError(f"keys must have shape ({b}, n_keys, {self.dim}), got {got}")
            prefix.append(keys.to(x.dtype))
        elif context_mask is not None:
            raise ValueError("context_mask was given without keys")
        n_ctx = 0 if keys is None else keys.shape[1]
        check_mask("context_mask", context_mask, (b, n_ctx))
        n_prefix = sum(p.shape[1] for p in prefix)
        seq = torch.cat([*prefix, x], dim=1) if prefix else x
        length = n_prefix + t

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

        qk, v = split_heads(self.toqk(seq)), split_heads(self.tov(seq))
        if self.qk_rescale is not None:
            qk = qk * self.qk_rescale
        if self.rotary_emb:  # rotate the sequence's queries/keys by position; the prefix is unrotated
            angles = rotary_angles(t, dh, x.device)
            qk = torch.cat([qk[:, :, :n_prefix], apply_rotary(qk[:, :, n_prefix:], angles)], dim=2)
        lh = self.n_local_attn_heads
        parts = []
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
            lqk = qk[:, lh:].reshape(rows, length, dh)
            lv = v[:, lh:].reshape(rows, length, dh)
            row_mask = None if mask is None else mask.repeat_interleave(h - lh, dim=0)
            if self.use_full_attn or length <= self.full_attn_thres:
                out, attn = full_qk_attention(
                    lqk,
                    lv,
                    causal=self.causal,
                    key_mask=row_mask,
                    dropout=self.attn_dropout,
                    training=self.training,
                )
                buckets = torch.empty(0, dtype=torch.long, device=x.device)
            else:
                out, attn, buckets = self.lsh_attn(lqk, lv, row_mask, chunks=self.attn_chunks)
            if self.callback is not None:  # per (batch, head): attn (b, h, L, L), buckets (b, h, n_hashes, L)
                self.callback(
                    None if attn is None else attn.view(b, h - lh, length, length),
                    buckets.view(b, h - lh, *buckets.shape[1:]) if buckets.numel() else buckets,
                )
            parts.append(out.view(b, h - lh, length, dh)[:, :, n_prefix:])
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (b, h, t, dh)
        out = out.transpose(1, 2).reshape(b, t, h * dh)
        return self.post_attn_dropout(self.to_out(out))
