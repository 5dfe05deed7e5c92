"""LSHAttention and FullQKAttention modules (heads folded into the batch)."""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_attn_mask, check_int, check_prob, check_qkv, check_query_len
from ..hashing import (
    BucketSpec,
    draw_rotations,
    hash_vectors,
    top_bucket_ids,
    total_buckets,
)
from ..positions import rotate_by_pos_emb
from ..reversible import remember
from .backends import lsh_attention
from .common import SELF_ATTN_VALUE
from .full import allowed_pairs, full_qk_attention
from .options import LSHOptions, layer_options, option_property


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
        rehash_each_round: True: a fresh rotation per round. False (``reformer_pytorch``'s
            option): one rotation, and each position goes to its ``n_hashes`` best buckets.
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
        self_value, exp_lse: the options ``self_attn_value`` and ``exp_lse_softmax`` of
            :class:`~reformer.attention.options.LSHOptions`.
        backend: ``"auto"`` (default), ``"chunked"``, ``"triton"`` or ``"flex"``; see
            :mod:`reformer.attention.backends` (auto: chunked on CPU, a fused kernel on CUDA).
        options: an :class:`~reformer.attention.options.LSHOptions` built once (a model builds
            it from its config) instead of the keywords above, which then keep their defaults.

    The options live in ``self.options``; each is also an attribute under its
    :class:`~reformer.attention.options.LSHOptions` name (``layer.n_hashes``,
    ``layer.lsh_dropout``, ``layer.attn_backend``, ...), and assigning one replaces the options.
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
        options: LSHOptions | None = None,
    ):
        options = layer_options(locals(), options)  # (first: locals() holds just the arguments)
        super().__init__()
        self.options = options
        self.heads = None if heads is None else check_int("heads", heads, 1)
        seed = self.options.hash_seed
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (), device="cpu").item())  # also under a meta device
        self.register_buffer("hash_seed", torch.tensor(int(seed), dtype=torch.int64))
        # The buffer's value as an int: reading the buffer at each forward would wait for a GPU
        # and break torch.compile's graph. Eager forwards re-read it after any write (its version
        # counter moves: load_state_dict, DDP's broadcast, fill_); a compiled one uses the int,
        # which loading also refreshes.
        self._seed = int(seed)
        self._seed_stamp = self._buffer_stamp()
        self._eval_rotations: tuple[tuple, torch.Tensor] | None = None

    def _buffer_stamp(self) -> tuple[int, int]:
        seed = self.hash_seed  # (an inference-mode tensor has no version counter: loading still refreshes)
        return id(seed), -1 if seed.is_inference() else seed._version

    def _current_seed(self) -> int:
        """The ``hash_seed`` buffer's value (read from it only when it was written or replaced)."""
        if not torch.compiler.is_compiling() and self._buffer_stamp() != self._seed_stamp:
            self._seed, self._seed_stamp = int(self.hash_seed), self._buffer_stamp()
        return self._seed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "hash_seed" in state_dict:
            self._seed = int(state_dict[prefix + "hash_seed"])

    def extra_repr(self) -> str:
        return (
            f"bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, "
            f"causal={self.causal}, strict_causal={self.strict_causal}, attn_backend={self.attn_backend!r}"
        )

    def bucket_spec(self, length: int) -> BucketSpec:
        """The bucket count used for an input of ``length`` positions."""
        return self.options.bucket_spec(length)

    def hash(self, qk: torch.Tensor) -> torch.Tensor:
        """Bucket ids ``(rows, n_hashes, len)`` of ``qk`` ``(rows, len, d)``."""
        rows, length, d = qk.shape
        n_buckets = self.bucket_spec(length)
        rounds = self.n_hashes if self.rehash_each_round else 1  # rotations drawn
        n_sets = 1
        if self.random_rotations_per_head:
            n_sets = self.heads if self.heads is not None and rows % self.heads == 0 else rows
        if self.training:
            rotations = draw_rotations(d, rounds, n_buckets, n_sets, device=qk.device, dtype=qk.dtype)
        elif torch.compiler.is_compiling():  # drawn in the graph (an opaque op): no cache for Dynamo to guard
            rotations = draw_rotations(d, rounds, n_buckets, n_sets, seed=self._seed, device=qk.device, dtype=qk.dtype)
        else:  # the same rotations every time: drawn once per seed and shape (decoding hashes per token);
            # n_hashes is part of the shape: it may be changed after training (reformer.switch)
            key = (self._current_seed(), d, rounds, n_buckets, n_sets, qk.device, qk.dtype)
            if self._eval_rotations is None or self._eval_rotations[0] != key:
                drawn = draw_rotations(d, rounds, n_buckets, n_sets, seed=key[0], device=qk.device, dtype=qk.dtype)
                self._eval_rotations = (key, drawn)
            rotations = self._eval_rotations[1]
        hashed = qk.detach()
        if self.training and self.drop_for_hash_rate > 0:  # (drawn on a re-run too: the RNG stays in step)
            hashed = F.dropout(hashed, self.drop_for_hash_rate)
        if self.rehash_each_round:
            ids = partial(hash_vectors, hashed, rotations, n_buckets, first_major=self.n_buckets_first_major)
        else:
            ids = partial(top_bucket_ids, hashed, rotations, n_buckets, self.n_hashes)
        with torch.no_grad():  # (a reversible block's re-run reuses its forward's buckets: see remember)
            return remember(ids)

    def forward(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        query_len: int | None = None,
        input_mask: torch.Tensor | None = None,
        input_attn_mask: torch.Tensor | None = None,
        pos_emb: torch.Tensor | None = None,
        *,
        chunks: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``qk``, ``v``: ``(rows, len, d)``; ``input_mask``: ``(rows, len)`` bool, True = real.

        ``reformer_pytorch``'s options: ``query_len``: only the first ``query_len`` positions are
        queries, the others keys that every query may see, causal or not (they take part in the
        sort as positions before the first query). ``pos_emb`` ``(1, n, d)``: a rotary encoding
        as ``[sin | cos]`` halves (``FixedPositionalEmbedding(d)`` there) that turns the first
        ``n`` positions' vectors after hashing, so the buckets are those of the unturned vectors.
        ``input_attn_mask`` ``(rows, n, m)`` bool: which query-key pairs may attend (pairs
        beyond ``n``, ``m`` may), applied to the pairs the windows hold (the chunked backend).

        ``chunks`` splits the rows to bound peak memory (hashing is done once for all).
        Returns ``out`` ``(rows, query_len, dv)``, ``attn`` ``(rows, query_len, len)`` when
        ``return_attn`` (else None) and ``buckets`` ``(rows, n_hashes, len)``.
        """
        check_qkv(qk, v, input_mask)
        check_int("chunks", chunks, 1)
        rows, length, _ = qk.shape
        keys_only = 0 if query_len is None else length - check_query_len(query_len, length)
        check_attn_mask(input_attn_mask, rows, length)
        pairs = allowed_pairs(input_attn_mask, length, length, False, qk.device)  # (rows, len, len) or None
        buckets = self.hash(qk)
        if pos_emb is not None:
            qk = rotate_by_pos_emb(qk, pos_emb)
        if not (keys_only and self.causal):
            out, attn = self._attend(qk, v, buckets, input_mask, pairs, chunks)
            return out[:, : length - keys_only], None if attn is None else attn[:, : length - keys_only], buckets
        # Causal: the keys-only positions go first, where causal masking hides none of them.
        first = partial(torch.roll, shifts=keys_only, dims=1)
        mask = None if input_mask is None else first(input_mask)
        if pairs is not None:
            pairs = pairs.roll((keys_only, keys_only), dims=(1, 2))
        out, attn = self._attend(first(qk), first(v), buckets.roll(keys_only, dims=2), mask, pairs, chunks)
        if attn is not None:  # back to the input's order, query rows only
            attn = attn.roll((-keys_only, -keys_only), dims=(1, 2))[:, : length - keys_only]
        return out[:, keys_only:], attn, buckets

    def _attend(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        buckets: torch.Tensor,
        input_mask: torch.Tensor | None,
        pairs: torch.Tensor | None,
        chunks: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(out, attn)`` of every position, ``chunks`` row ranges at a time; ``pairs``
        ``(rows, len, len)``: the query-key pairs that may attend, or None for all."""
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
                self.options,
                n_buckets=n_total,
                key_mask=None if input_mask is None else part(input_mask),
                attn_mask=None if pairs is None else part(pairs),
                training=self.training,
            )
            outs.append(out)
            attns.append(attn)
        if parts == 1:  # (a cat of one tensor would copy it)
            return outs[0], attns[0]
        attn = torch.cat(attns) if self.return_attn else None
        return torch.cat(outs), attn


for _name in (f.name for f in dataclasses.fields(LSHOptions) if f.name != "hash_seed"):  # (hash_seed: a buffer)
    setattr(LSHAttention, _name, option_property(_name))


class FullQKAttention(nn.Module):
    """Dense shared-QK attention with the masks of :class:`LSHAttention` (O(len^2))."""

    def __init__(self, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.causal = bool(causal)
        self.dropout = check_prob("dropout", dropout)

    def forward(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        query_len: int | None = None,
        input_mask: torch.Tensor | None = None,
        input_attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``qk``, ``v``: ``(rows, len, d)``; ``input_mask`` ``(rows, len)`` bool, True = real.

        As in ``reformer_pytorch``: only the first ``query_len`` positions are queries (the
        others are keys every query sees, causal or not); ``input_attn_mask`` ``(rows, n, m)``
        bool says which query-key pairs may attend (padded with True to ``len``). Returns
        ``out`` ``(rows, query_len, dv)``, ``attn`` ``(rows, query_len, len)`` and an empty tensor."""
        check_qkv(qk, v, input_mask)
        rows, length, _ = qk.shape
        query_len = length if query_len is None else check_query_len(query_len, length)
        check_attn_mask(input_attn_mask, rows, length)
        allowed = allowed_pairs(input_attn_mask, length, query_len, self.causal, qk.device)
        out, attn = full_qk_attention(
            qk, v, key_mask=input_mask, allowed=allowed, dropout=self.dropout, training=self.training
        )
        return out[:, :query_len], attn[:, :query_len], torch.empty(0, dtype=torch.long, device=qk.device)
