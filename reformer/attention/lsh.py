"""LSHAttention and FullQKAttention modules (heads folded into the batch)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int, check_prob, check_qkv
from ..hashing import (
    BucketSpec,
    buckets_for_length,
    draw_rotations,
    hash_vectors,
    total_buckets,
    validate_n_buckets,
)
from ..reversible import remember
from .backends import check_backend, lsh_attention
from .common import SELF_ATTN_VALUE
from .full import full_qk_attention


def _rows(rows: slice, t: torch.Tensor) -> torch.Tensor:
    return t[rows]


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


class LSHAttention(nn.Module):
    """Multi-round LSH attention with shared queries and keys (Kitaev et al. 2020).

    Args:
        dropout: dropout on the attention weights (training only).
        bucket_size: chunk length; each query attends within its chunk and the previous one.
        n_hashes: number of hashing rounds, combined by their log-sum-exp.
        causal: autoregressive masking. With ``strict_causal=True`` (default) a query sees
            only the at most ``bucket_size`` keys of its own bucket that precede it in the
            round's sorted order, so its output depends on earlier positions only. With
            ``strict_causal=False`` it is the classic trax / Hugging Face rule: every earlier
            key in the (chunk, previous chunk) window - where chunk boundaries, and so earlier
            outputs, can shift when later tokens change.
        strict_causal: see ``causal``; ignored when ``causal=False``.
        allow_duplicate_attention: if False, subtract ``log N_ij`` from each logit, where
            ``N_ij`` counts the window entries in all rounds in which query i sees key j, so
            the combined attention is a softmax over the *set* of keys seen.
        attend_across_buckets: if False, keys of other buckets (or other rounds) in the
            window are masked too (the paper's strict ``P_i``).
        random_rotations_per_head: a separate random rotation per head instead of one shared.
        rehash_each_round: ``reformer_pytorch``'s option; only True (a fresh rotation per round).
        drop_for_hash_rate: in training, dropout on the vectors that are hashed (not on those
            attended with), as in ``reformer_pytorch``.
        return_attn: also return the dense ``(batch, len, len)`` attention (costly).
        n_buckets: buckets per round: an even int, or a factorised tuple such as
            ``(64, 128)``. Default: derived from ``max_seq_len``, or else from the input length.
        max_seq_len: the longest sequence the layer will see; fixes ``n_buckets``
            (``max_seq_len // bucket_size``, even) so that hashing never depends on length.
        heads: heads folded into the batch (rows ordered ``(batch, head)``); with
            ``random_rotations_per_head`` the rotations are per head, not per row.
        hash_seed: seed of the eval-mode rotations (default: drawn from torch's RNG at
            construction and saved in the state dict). Training always draws fresh rotations.
        pad_bucket: positions hidden by ``input_mask`` get an extra last bucket (trax / HF).
        n_buckets_first_major: see :func:`reformer.hashing.hash_vectors` (``first_major``).
        self_value, exp_lse: see :func:`reformer.attention.chunked.lsh_attention_chunked`.
        backend: ``"auto"`` (default), ``"chunked"``, ``"triton"`` or ``"flex"``; see
            :mod:`reformer.attention.backends` (auto: chunked on CPU, a fused kernel on CUDA).
    """

    def __init__(
        self,
        dropout: float = 0.0,
        bucket_size: int = 64,
        n_hashes: int = 8,
        causal: bool = False,
        allow_duplicate_attention: bool = True,
        attend_across_buckets: bool = True,
        rehash_each_round: bool = True,
        drop_for_hash_rate: float = 0.0,
        random_rotations_per_head: bool = False,
        return_attn: bool = False,
        *,
        strict_causal: bool = True,
        n_buckets: BucketSpec | None = None,
        max_seq_len: int | None = None,
        heads: int | None = None,
        hash_seed: int | None = None,
        pad_bucket: bool = False,
        n_buckets_first_major: bool = True,
        self_value: float = SELF_ATTN_VALUE,
        exp_lse: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.backend = check_backend(backend)
        self.self_value, self.exp_lse = float(self_value), bool(exp_lse)
        self.pad_bucket = bool(pad_bucket)
        self.n_buckets_first_major = bool(n_buckets_first_major)
        self.dropout = check_prob("dropout", dropout)
        if not rehash_each_round:
            raise ValueError("rehash_each_round=False (one rotation for every round) is not offered; use True")
        self.drop_for_hash_rate = check_prob("drop_for_hash_rate", drop_for_hash_rate)
        self.bucket_size = check_int("bucket_size", bucket_size, 1)
        self.n_hashes = check_int("n_hashes", n_hashes, 1)
        self.causal = bool(causal)
        self.strict_causal = bool(strict_causal)
        self.allow_duplicate_attention = bool(allow_duplicate_attention)
        self.attend_across_buckets = bool(attend_across_buckets)
        self.random_rotations_per_head = bool(random_rotations_per_head)
        self.return_attn = bool(return_attn)
        if max_seq_len is not None:
            check_int("max_seq_len", max_seq_len, 1)
        if n_buckets is None and max_seq_len is not None:
            n_buckets = buckets_for_length(max_seq_len, bucket_size)
        self.n_buckets = None if n_buckets is None else validate_n_buckets(n_buckets)
        self.heads = None if heads is None else check_int("heads", heads, 1)
        if hash_seed is None:
            hash_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu").item())  # also under a meta device
        self.register_buffer("hash_seed", torch.tensor(int(hash_seed), dtype=torch.int64))
        self._eval_rotations: tuple[tuple, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return (
            f"bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, "
            f"causal={self.causal}, strict_causal={self.strict_causal}, backend={self.backend!r}"
        )

    def bucket_spec(self, length: int) -> BucketSpec:
        """The bucket count used for an input of ``length`` positions."""
        return self.n_buckets if self.n_buckets is not None else buckets_for_length(length, self.bucket_size)

    def hash(self, qk: torch.Tensor) -> torch.Tensor:
        """Bucket ids ``(rows, n_hashes, len)`` of ``qk`` ``(rows, len, d)``."""
        rows, length, d = qk.shape
        n_buckets = self.bucket_spec(length)
        n_sets = 1
        if self.random_rotations_per_head:
            n_sets = self.heads if self.heads is not None and rows % self.heads == 0 else rows
        if self.training:
            rotations = draw_rotations(d, self.n_hashes, n_buckets, n_sets, device=qk.device, dtype=qk.dtype)
        else:  # the same rotations every time: drawn once per seed and shape (decoding hashes per token);
            # n_hashes is part of the shape: it may be changed after training (reformer.switch)
            key = (int(self.hash_seed), d, self.n_hashes, n_buckets, n_sets, qk.device, qk.dtype)
            if self._eval_rotations is None or self._eval_rotations[0] != key:
                drawn = draw_rotations(
                    d, self.n_hashes, n_buckets, n_sets, seed=key[0], device=qk.device, dtype=qk.dtype
                )
                self._eval_rotations = (key, drawn)
            rotations = self._eval_rotations[1]
        hashed = qk.detach()
        if self.training and self.drop_for_hash_rate > 0:  # (drawn on a re-run too: the RNG stays in step)
            hashed = F.dropout(hashed, self.drop_for_hash_rate)
        with torch.no_grad():  # (a reversible block's re-run reuses its forward's buckets: see remember)
            return remember(lambda: hash_vectors(hashed, rotations, n_buckets, first_major=self.n_buckets_first_major))

    def forward(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        *,
        chunks: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``qk``, ``v``: ``(rows, len, d)``; ``input_mask``: ``(rows, len)`` bool, True = real.

        ``chunks`` splits the rows to bound peak memory (hashing is done once for all).
        Returns ``out`` ``(rows, len, dv)``, ``attn`` ``(rows, len, len)`` when
        ``return_attn`` (else None) and ``buckets`` ``(rows, n_hashes, len)``.
        """
        check_qkv(qk, v, input_mask)
        check_int("chunks", chunks, 1)
        buckets = self.hash(qk)
        n_total = total_buckets(self.bucket_spec(qk.shape[1]))
        if self.pad_bucket and input_mask is not None:  # the id the chunked path gives its padding
            buckets = buckets.masked_fill(~input_mask[:, None, :], n_total)
        outs, attns = [], []
        rows, parts = qk.shape[0], min(chunks, qk.shape[0])
        for i in range(parts):  # near-equal row ranges, as tensor_split would give
            sl = slice(rows * i // parts, rows * (i + 1) // parts)
            part = partial(_rows, sl) if parts > 1 else _whole  # (no slice of one part: its backward copies)
            out, attn = lsh_attention(
                part(qk),
                part(v),
                part(buckets),
                bucket_size=self.bucket_size,
                n_buckets=n_total,
                causal=self.causal,
                strict_causal=self.strict_causal,
                key_mask=None if input_mask is None else part(input_mask),
                allow_duplicate_attention=self.allow_duplicate_attention,
                attend_across_buckets=self.attend_across_buckets,
                dropout=self.dropout,
                training=self.training,
                return_attn=self.return_attn,
                self_value=self.self_value,
                exp_lse=self.exp_lse,
                backend=self.backend,
            )
            outs.append(out)
            attns.append(attn)
        if parts == 1:  # (a cat of one tensor would copy it)
            return outs[0], attns[0], buckets
        attn = torch.cat(attns) if self.return_attn else None
        return torch.cat(outs), attn, buckets


class FullQKAttention(nn.Module):
    """Dense shared-QK attention with the masks of :class:`LSHAttention` (O(len^2))."""

    def __init__(self, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.causal = bool(causal)
        self.dropout = check_prob("dropout", dropout)

    def forward(
        self, qk: torch.Tensor, v: torch.Tensor, input_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_qkv(qk, v, input_mask)
        out, attn = full_qk_attention(
            qk, v, causal=self.causal, key_mask=input_mask, dropout=self.dropout, training=self.training
        )
        return out, attn, torch.empty(0, dtype=torch.long, device=qk.device)
