"""Reformer models: the reversible stack (`Reformer`) and the language model (`ReformerLM`).

Both take their options as keyword arguments with the names of ``reformer_pytorch`` (the
fields of :class:`reformer.config.ReformerConfig`), or a ready ``config=``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LSHOptions, LSHSelfAttention
from .attention.cross import CrossAttention
from .attention.decode import DecodingCache
from .attention.dense import DenseSelfAttention
from .attention.local import BlockLocalAttention
from .checkpoint import PretrainedMixin
from .checks import check_features, check_mask
from .config import PEER_ALIASES, ReformerConfig
from .feedforward import FeedForward
from .generate import generate, stream
from .loss import chunked_cross_entropy, default_chunk_size
from .pkm import PKM
from .positions import AbsolutePositionalEmbedding, AxialPositionalEmbedding, FixedPositionalEmbedding
from .reversible import ReversibleBlock, irreversible_apply, reversible_apply
from .wrappers import TrainingWrapper, batch_sequences


class ScaleNorm(nn.Module):
    """``g * x / ||x||`` with one learned scale (Nguyen & Salazar 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(math.sqrt(dim)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.g / x.norm(dim=-1, keepdim=True).clamp_min(self.eps))


class PreNorm(nn.Module):
    """Normalise, then apply ``fn``."""

    def __init__(self, norm: nn.Module, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = norm, fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class ReZero(nn.Module):
    """``fn(x) * g`` with ``g`` learned from zero (Bachlechner et al. 2020), no normalisation."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(x, **kwargs) * self.g


class CrossThenFeedForward(nn.Module):
    """The ``g`` of a decoder block: cross-attention to the encoder output, then the
    feed-forward on the result (``g(y) = c + FF(y + c)`` with ``c = Cross(y)``, each sublayer
    pre-normed) - so a decoder block stays one reversible ``(f, g)`` pair."""

    def __init__(self, cross: nn.Module, ff: nn.Module):
        super().__init__()
        self.cross, self.ff = cross, ff

    def forward(
        self, y: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if context is None:
            raise ValueError("this model has cross-attention layers: pass the encoder output as context=")
        c = self.cross(y, context=context, context_mask=context_mask)
        return c + self.ff(y + c)


def _config(config: ReformerConfig | None, kwargs: dict[str, Any]) -> ReformerConfig:
    if config is not None and kwargs:
        raise TypeError(f"pass either config= or keyword options, not both (got {sorted(kwargs)})")
    if config is not None:
        return config
    for peer_name, name in PEER_ALIASES.items():
        if peer_name in kwargs:
            if name in kwargs:
                raise TypeError(f"pass {name} or {peer_name} (its reformer_pytorch name), not both")
            kwargs[name] = kwargs.pop(peer_name)
    known = set(ReformerConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; see ReformerConfig for the allowed names")
    return ReformerConfig(**kwargs)


class Reformer(PretrainedMixin, nn.Module):
    """A stack of ``depth`` reversible blocks on ``(batch, len, dim)``: attention then
    feed-forward (or attention twice with ``twin_attention``). The input is duplicated into
    the two reversible halves and the output is their mean (``(batch, len, dim)``), or with
    ``reversible_output="concat"`` their concatenation (``(batch, len, 2 * dim)``). With
    ``residual="standard"`` the same blocks form an ordinary residual stack instead."""

    def __init__(self, config: ReformerConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:  # a stack on embeddings needs no length limit (as in reformer_pytorch)
            kwargs.setdefault("max_seq_len", None)
        self.config = cfg = _config(config, kwargs)

        def wrap(fn: nn.Module) -> nn.Module:
            if cfg.use_rezero:
                return ReZero(fn)
            return PreNorm(ScaleNorm(cfg.dim) if cfg.use_scale_norm else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps), fn)

        lsh_options = LSHOptions.from_config(cfg)

        def attention(kind: str) -> nn.Module:
            if kind == "local" and cfg.local_qkv:
                return wrap(
                    BlockLocalAttention(
                        cfg.dim,
                        cfg.heads,
                        cfg.chunk_length("local"),
                        dim_head=cfg.dim_head,
                        chunks_before=cfg.local_chunks_before,
                        chunks_after=cfg.local_chunks_after,
                        causal=cfg.causal,
                        dropout=cfg.lsh_dropout,
                        post_attn_dropout=cfg.post_attn_dropout,
                        out_bias=cfg.attn_out_bias,
                    )
                )
            if kind == "full" and not cfg.shared_qk:
                return wrap(
                    DenseSelfAttention(
                        cfg.dim,
                        cfg.heads,
                        dim_head=cfg.dim_head,
                        causal=cfg.causal,
                        dropout=cfg.lsh_dropout,
                        post_attn_dropout=cfg.post_attn_dropout,
                        out_bias=cfg.attn_out_bias,
                    )
                )
            return wrap(
                LSHSelfAttention(
                    dim=cfg.dim,
                    heads=cfg.heads,
                    dim_head=cfg.dim_head,
                    attn_chunks=cfg.attn_chunks,
                    num_mem_kv=cfg.num_mem_kv,
                    use_full_attn=kind == "full",
                    full_attn_thres=cfg.full_attn_thres,
                    post_attn_dropout=cfg.post_attn_dropout,
                    n_local_attn_heads=cfg.heads if kind == "local" else cfg.n_local_attn_heads,
                    one_value_head=cfg.one_value_head,
                    rotary_emb=cfg.position_emb == "rotary",
                    qk_logit_scale=cfg.qk_logit_scale,
                    out_bias=cfg.attn_out_bias,
                    options=lsh_options,
                )
            )

        def feedforward(use_pkm: bool) -> nn.Module:
            if use_pkm:
                ff = wrap(PKM(cfg.dim, num_keys=cfg.pkm_num_keys))
            else:
                ff = wrap(
                    FeedForward(
                        cfg.dim,
                        mult=cfg.ff_mult,
                        dropout=cfg.ff_dropout,
                        activation=cfg.ff_activation,
                        glu=cfg.ff_glu,
                        chunks=cfg.ff_chunks,
                    )
                )
            if not cfg.cross_attention:
                return ff
            cross = CrossAttention(cfg.dim, heads=cfg.heads, dim_head=cfg.dim_head, dropout=cfg.post_attn_dropout)
            return CrossThenFeedForward(wrap(cross), ff)

        kinds = cfg.layer_kinds()
        attn_args = ("keys", "input_mask", "context_mask", "cache")
        if cfg.cross_attention:  # context_mask masks the encoder output of the cross-attention
            routing = dict(f_args=("keys", "input_mask", "cache"), g_args=("context", "context_mask"))
        else:
            routing = dict(f_args=attn_args, g_args=attn_args if cfg.twin_attention else ())
        blocks = []
        tied_g: dict[bool, nn.Module] = {}  # weight_tie: the first feed-forward and the first PKM
        for i, kind in enumerate(kinds):
            use_pkm = i + 1 in cfg.pkm_layers
            if cfg.weight_tie and i > 0:  # same modules at every depth (the same kind each time)
                g = tied_g[use_pkm] if use_pkm in tied_g else feedforward(use_pkm)
                blocks.append(ReversibleBlock(blocks[0].f, g, **routing))
            else:
                g = attention(kind) if cfg.twin_attention else feedforward(use_pkm)
                blocks.append(ReversibleBlock(attention(kind), g, **routing))
            tied_g.setdefault(use_pkm, g)
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor | None = None,
        input_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        cache: DecodingCache | None = None,
    ) -> torch.Tensor:
        """``x`` ``(b, n, dim)`` -> ``(b, n, dim)``; masks are bool, True = real token.

        ``keys`` ``(b, c, dim)``: extra keys for self-attention (masked by ``context_mask``).
        With ``cross_attention``, ``context`` ``(b, m, dim)`` is the encoder output the
        decoder attends to, and ``context_mask`` masks it instead. ``cache``: incremental
        decoding in eval mode - the first call fills it, each later call adds one position."""
        cfg = self.config
        check_features("x", x, cfg.dim)
        seen = 0 if cache is None else cache.seq_len
        if cfg.max_seq_len is not None and seen + x.shape[1] > cfg.max_seq_len:
            raise ValueError(f"sequence length {seen + x.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
        check_mask("input_mask", input_mask, tuple(x.shape[:2]))
        length = x.shape[1]
        if cache is None:  # (decoding goes one position at a time; padding would add positions)
            x, input_mask = self._pad_to_chunks(x, input_mask)
        kwargs = {
            k: v
            for k, v in (
                ("keys", keys),
                ("input_mask", input_mask),
                ("context_mask", context_mask),
                ("context", context),
            )
            if v is not None
        }
        if cache is not None:
            if self.training:
                raise ValueError("cached decoding needs eval mode (training draws fresh LSH rotations): call .eval()")
            if seen and cache.stale_at(seen + x.shape[1]):
                raise ValueError(
                    f"at {seen + x.shape[1]} positions a layer stops attending densely (full_attn_thres): "
                    "run the prefill again on the whole sequence with an empty cache"
                )
            cache.reserve(seen + x.shape[1])
            x = self.run_cached(x, cache, **kwargs)
            cache.advance(x.shape[1], x.device)
            return x
        blocks = list(self.blocks)
        if self.training and cfg.layer_dropout > 0:
            keep = torch.rand(len(blocks)) >= cfg.layer_dropout
            keep[torch.randint(len(blocks), ())] = True  # never drop every block
            blocks = [b for b, k in zip(blocks, keep.tolist(), strict=True) if k]
        reversible = torch.is_grad_enabled() and x.shape[1] >= cfg.reverse_thres
        return self._run_blocks(blocks, x, reversible=reversible, **kwargs)[:, :length]

    def run_cached(self, x: torch.Tensor, cache: DecodingCache, **kwargs: Any) -> torch.Tensor:
        """The blocks on ``x`` ``(b, n, dim)`` with a decoding cache (the prefill, or one more
        position), without the checks and bookkeeping of :meth:`forward`: the decode step's
        hot path, which reads only tensors and fixed shapes from the cache."""
        cache.begin()
        return self._run_blocks(self.blocks, x, reversible=False, **kwargs, cache=cache)

    def _run_blocks(
        self, blocks: list[ReversibleBlock], x: torch.Tensor, reversible: bool, **kwargs: Any
    ) -> torch.Tensor:
        """Run ``blocks`` on ``x`` ``(b, n, dim)``: as RevNet blocks on two copies of ``x``
        (recomputing activations in the backward when ``reversible``) whose halves are merged
        (mean, or concatenated to ``2 dim``), or as a standard residual stack."""
        if self.config.residual == "standard":
            for block in blocks:
                x = x + block.run_f(x, kwargs)
                x = x + block.run_g(x, kwargs)
            return x
        x1, x2 = (reversible_apply if reversible else irreversible_apply)(blocks, x, x, **kwargs)
        return torch.cat([x1, x2], dim=-1) if self.config.reversible_output == "concat" else (x1 + x2) / 2

    def _pad_to_chunks(
        self, x: torch.Tensor, input_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With ``pad_to_chunk_multiple``: ``x`` ``(b, n, dim)`` padded with masked positions to a
        multiple of the lcm of the layers' chunk lengths when longer than the shortest one, so
        that every layer chunks the sequence as Hugging Face does."""
        cfg = self.config
        chunks = {cfg.chunk_length(kind) for kind in cfg.layer_kinds()} - {None}
        n = x.shape[1]
        if not cfg.pad_to_chunk_multiple or not chunks or n <= min(chunks):
            return x, input_mask
        pad = -n % math.lcm(*chunks)
        if pad == 0:
            return x, input_mask
        if input_mask is None:
            input_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return F.pad(x, (0, 0, 0, pad)), F.pad(input_mask, (0, pad), value=False)


class TokenModel(PretrainedMixin, nn.Module):
    """Token ids ``(batch, len)`` -> final normed hidden states ``(batch, len, out_dim)``: the
    embeddings, the :class:`Reformer` stack and the final norm, which every task model shares
    (:class:`ReformerLM` adds the language-model head, :mod:`reformer.heads` the others)."""

    def __init__(self, config: ReformerConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = cfg = _config(config, kwargs)
        if cfg.max_seq_len is None:
            raise ValueError(f"{type(self).__name__} needs max_seq_len (its positions are bounded by it)")
        emb_dim = cfg.model_emb_dim
        self.token_emb = nn.Embedding(cfg.num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.to_model_dim = nn.Linear(emb_dim, cfg.dim) if emb_dim != cfg.dim else nn.Identity()
        if cfg.position_emb == "absolute":
            self.pos_emb = AbsolutePositionalEmbedding(emb_dim, cfg.max_seq_len)
        elif cfg.position_emb == "fixed":
            self.pos_emb = FixedPositionalEmbedding(emb_dim)
        elif cfg.position_emb == "axial":
            shape = cfg.axial_position_shape or (-(-cfg.max_seq_len // cfg.bucket_size), cfg.bucket_size)
            self.pos_emb = AxialPositionalEmbedding(emb_dim, shape, cfg.axial_position_dims)
        else:  # "rotary" (in the attention layers) or "none"
            self.pos_emb = None
        self.reformer = Reformer(cfg)
        self.norm = nn.LayerNorm(self.out_dim, eps=cfg.norm_eps)

    @property
    def out_dim(self) -> int:
        """Width of the final hidden states: ``dim``, or ``2 dim`` with ``reversible_output="concat"``."""
        return self.config.dim * (2 if self.config.reversible_output == "concat" else 1)

    def embed(self, tokens: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Token + position embeddings (positions from ``offset``) at the model width: ``(b, n, dim)``."""
        x = self.token_emb(tokens.long())  # (any integer dtype: uint8 and int16 ids too)
        if self.pos_emb is not None:
            x = x + self.pos_emb(tokens.shape[1], device=tokens.device, offset=offset).to(x.dtype)
        return self.to_model_dim(x)

    def cache_unsupported_reason(self) -> str | None:
        """Why cached decoding could not reproduce this model's forward exactly, or None."""
        for module in self.modules():
            if isinstance(module, BlockLocalAttention):
                return "Hugging Face-style local layers (local_qkv=True) have no decoding cache"
            if isinstance(module, DenseSelfAttention):
                return "separate-QK dense layers (shared_qk=False) have no decoding cache"
            if isinstance(module, LSHSelfAttention):
                reason = module.cache_unsupported_reason()
                if reason is not None:
                    return reason
        return None

    def check_tokens(self, tokens: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must have shape (batch, len), got {got}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.shape[1] > cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
        if torch.compiler.is_compiling():  # the range check reads values: a graph break
            return
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.num_tokens):
            raise ValueError(
                f"token ids must be in [0, num_tokens={cfg.num_tokens}), got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )

    def hidden(self, tokens: torch.Tensor, input_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Final normed hidden states ``(b, n, out_dim)`` of token ids ``(b, n)``; ``kwargs`` as in
        :meth:`Reformer.forward`."""
        self.check_tokens(tokens)
        return self.norm(self.reformer(self.embed(tokens), input_mask=input_mask, **kwargs))


class ReformerLM(TokenModel):
    """Token ids ``(batch, len)`` -> logits ``(batch, len, num_tokens)`` (or the final hidden
    states with ``return_embeddings``)."""

    def __init__(self, config: ReformerConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg = self.config
        # The head works at emb_dim when it is given or tied to the embedding, else at out_dim.
        head_dim = cfg.model_emb_dim if cfg.emb_dim is not None or cfg.weight_tie_embedding else self.out_dim
        self.to_emb_dim = nn.Linear(self.out_dim, head_dim) if head_dim != self.out_dim else nn.Identity()
        self.to_logits = None if cfg.weight_tie_embedding else nn.Linear(head_dim, cfg.num_tokens)

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor | None = None,
        input_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        cache: DecodingCache | None = None,
        targets: torch.Tensor | None = None,
        loss_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Token ids ``x`` ``(b, n)`` -> logits ``(b, n, num_tokens)``; other arguments as in
        :meth:`Reformer.forward`.

        With ``targets`` ``(b, n)`` (the token each position should predict, ``-100`` where
        none) it returns instead the mean cross-entropy in nats, fp32, computed
        ``loss_chunk_size`` positions at a time (default: about 16M logits per chunk) so the
        whole ``(b, n, num_tokens)`` logits never exist, in the backward either
        (:mod:`reformer.loss`). Training through ``model(x, targets=y)`` keeps DDP and FSDP
        in the loop, which a separate method would bypass.

        With ``cache`` (a :class:`~reformer.attention.decode.DecodingCache`, eval mode) the
        first call is the prefill and each later call continues the same sequence, returning
        the logits of the new tokens only - equal to those of a full forward on the whole
        sequence so far, at a cost per token that does not grow with it (LSH layers)."""
        self.check_tokens(x)
        if targets is not None:
            self._check_targets(x, targets, cache)
        if cache is not None:
            return self._forward_cached(x, cache, context, context_mask)
        hidden = self.reformer(
            self.embed(x), keys=keys, input_mask=input_mask, context_mask=context_mask, context=context
        )
        if targets is None:
            return self._head(hidden)
        chunk = default_chunk_size(self.config.num_tokens) if loss_chunk_size is None else loss_chunk_size
        return chunked_cross_entropy(hidden, self._head, targets, chunk)

    def _check_targets(self, tokens: torch.Tensor, targets: torch.Tensor, cache: DecodingCache | None) -> None:
        if not isinstance(targets, torch.Tensor) or targets.shape != tokens.shape:
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {got}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise ValueError(f"targets must be an integer tensor, got dtype {targets.dtype}")
        if self.config.return_embeddings:
            raise ValueError("targets needs logits: this model has return_embeddings=True")
        if cache is not None:
            raise ValueError("targets (a training loss) cannot be combined with a decoding cache")

    def _forward_cached(self, tokens, cache, context, context_mask) -> torch.Tensor:
        if cache.tokens is not None and tokens.shape[0] != cache.tokens.shape[0]:
            raise ValueError(f"tokens has batch {tokens.shape[0]}, the cache {cache.tokens.shape[0]}")
        if cache.seq_len + tokens.shape[1] > self.config.max_seq_len:  # checked before the cache changes
            raise ValueError(
                f"sequence length {cache.seq_len + tokens.shape[1]} (cached {cache.seq_len} + new "
                f"{tokens.shape[1]}) exceeds max_seq_len={self.config.max_seq_len}"
            )
        if cache.empty:  # prefill
            reason = self.cache_unsupported_reason()
            if reason is not None:
                raise ValueError(f"cached decoding would not equal this model's forward: {reason}")
            x = self.reformer(self.embed(tokens), context=context, context_mask=context_mask, cache=cache)
            cache.tokens = tokens
            return self._head(x)
        step = _compiled_decode_token(cache.compile) if cache.compile else type(self)._decode_token
        logits = []
        for i in range(tokens.shape[1]):  # one position at a time
            token = tokens[:, i : i + 1].contiguous()  # (strides of a growing history would recompile a compiled step)
            if cache.stale_at(cache.seq_len + 1):  # a layer stops attending densely: start again
                history = torch.cat([cache.tokens, token], dim=1)
                cache.clear()
                logits.append(self._forward_cached(history, cache, context, context_mask)[:, -1:])
                continue
            cache.reserve(cache.seq_len + 1)
            logits.append(step(self, token, cache, context, context_mask))
            cache.advance(1, token.device)
            cache.tokens = torch.cat([cache.tokens, token], dim=1)
        return torch.cat(logits, dim=1)

    def _decode_token(self, token, cache, context, context_mask) -> torch.Tensor:
        """Logits ``(b, 1, num_tokens)`` of one more token ``(b, 1)`` through a prefilled
        ``cache``: the decode step, with no host decisions (what ``compile`` compiles)."""
        kwargs = {k: v for k, v in (("context", context), ("context_mask", context_mask)) if v is not None}
        return self._head(self.reformer.run_cached(self.embed(token, offset=cache.position), cache, **kwargs))

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **options: Any) -> torch.Tensor:
        """New tokens ``(b, <= max_new_tokens)`` after ``prompt`` ``(b, n)`` (rows of equal length).

        Options: ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``eos_token``,
        ``use_cache`` (default True: prefill, then cached decoding), ``seed``, ``compile``
        (the decode step through ``torch.compile``); see :func:`reformer.generate.stream`."""
        return generate(self, prompt, max_new_tokens, **options)

    def stream(self, prompt: torch.Tensor, max_new_tokens: int, **options: Any) -> Iterator[torch.Tensor]:
        """Like :meth:`generate`, but yields each step's tokens ``(b,)`` as soon as they exist."""
        return stream(self, prompt, max_new_tokens, **options)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(..., dim)`` -> logits (or the normed states), position by position."""
        x = self.norm(x)
        if self.config.return_embeddings:
            return x
        x = self.to_emb_dim(x)
        if self.to_logits is None:
            return x @ self.token_emb.weight.t()
        return self.to_logits(x)


def _split_enc_dec(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``enc_*`` and ``dec_*`` keywords (prefix removed), and the rest."""
    enc = {k[4:]: v for k, v in kwargs.items() if k.startswith("enc_")}
    dec = {k[4:]: v for k, v in kwargs.items() if k.startswith("dec_")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(("enc_", "dec_"))}
    return enc, dec, rest


class ReformerEncDec(PretrainedMixin, nn.Module):
    """Encoder (bidirectional ``ReformerLM`` returning embeddings) + decoder (causal
    ``ReformerLM`` whose blocks cross-attend to every encoder output).

    Options as in ``reformer_pytorch``: ``enc_*`` go to the encoder, ``dec_*`` to the decoder,
    the rest (``heads``, ...) to both; the decoder's ``bucket_size`` defaults to twice the
    encoder's. ``forward(seq_in, seq_out, return_loss=True)`` gives the next-token loss of
    ``seq_out`` (positions equal to ``ignore_index`` left out); without ``return_loss`` the
    decoder's logits. Call-time ``enc_*`` / ``dec_*`` keywords go to the encoder's / decoder's
    forward: ``enc_input_mask`` masks the input (and, unless ``dec_context_mask`` is given, the
    decoder's view of it), ``dec_input_mask`` the output sequence. Sequences may also be lists
    of 1-D tensors, padded with ``pad_value`` (as :class:`~reformer.wrappers.TrainingWrapper`).
    """

    def __init__(self, dim: int, ignore_index: int = 0, pad_value: int = 0, **kwargs: Any):
        super().__init__()
        enc, dec, shared = _split_enc_dec(kwargs)
        for name in ("return_embeddings", "causal", "cross_attention"):
            if name in enc or name in dec or name in shared:
                raise TypeError(f"ReformerEncDec sets {name} itself; do not pass it")
        if "bucket_size" not in dec and "bucket_size" not in shared:
            dec["bucket_size"] = 2 * enc.get("bucket_size", ReformerConfig.bucket_size)
        self.encoder = ReformerLM(dim=dim, **shared, **enc, return_embeddings=True)
        self.decoder = ReformerLM(dim=dim, **shared, **dec, causal=True, cross_attention=True)
        self.ignore_index = ignore_index
        self.pad_value = pad_value

    def _saved_config(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.config.to_dict(),
            "decoder": self.decoder.config.to_dict(),
            "ignore_index": self.ignore_index,
            "pad_value": self.pad_value,
        }

    @classmethod
    def _from_saved_config(cls, saved: dict[str, Any]) -> ReformerEncDec:
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.encoder = ReformerLM(config=ReformerConfig.from_dict(saved["encoder"]))
        model.decoder = ReformerLM(config=ReformerConfig.from_dict(saved["decoder"]))
        model.ignore_index, model.pad_value = saved["ignore_index"], saved["pad_value"]
        return model

    def _wrapped_decoder(self) -> TrainingWrapper:
        return TrainingWrapper(self.decoder, ignore_index=self.ignore_index, pad_value=self.pad_value)

    def encode(self, seq_in: torch.Tensor | list[torch.Tensor], input_mask: torch.Tensor | None = None,
               **kwargs: Any) -> torch.Tensor:  # fmt: skip
        """The encoder output ``(b, n, dim)`` the decoder attends to."""
        return self.encoder(batch_sequences(seq_in, self.pad_value), input_mask=input_mask, **kwargs)

    def _decoder_kwargs(self, seq_in, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run the encoder on ``seq_in``; return the decoder's forward keywords (``context``,
        ``context_mask``, ``dec_*``) and the remaining ones."""
        enc, dec, rest = _split_enc_dec(kwargs)
        dec.setdefault("context_mask", enc.get("input_mask"))
        dec["context"] = self.encode(seq_in, **enc)
        return dec, rest

    def forward(
        self,
        seq_in: torch.Tensor | list[torch.Tensor],
        seq_out: torch.Tensor | list[torch.Tensor],
        return_loss: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        dec, rest = self._decoder_kwargs(seq_in, kwargs)
        if rest:
            raise TypeError(f"unknown keyword(s) {sorted(rest)}: give encoder / decoder ones with enc_ / dec_")
        return self._wrapped_decoder()(seq_out, return_loss=return_loss, **dec)

    def generate(self, seq_in: torch.Tensor, seq_out_start: torch.Tensor, seq_len: int, **kwargs: Any) -> torch.Tensor:
        """Sample ``seq_len`` tokens after ``seq_out_start`` ``(b, n)`` (or ``(n,)``) given
        ``seq_in``; returns ``(b, <= seq_len)`` (or ``(<= seq_len,)``). Keywords: ``enc_*`` /
        ``dec_*`` as in :meth:`forward`, the rest (``eos_token``, ``temperature``,
        ``filter_thres``, ...) as in :meth:`reformer.wrappers.TrainingWrapper.generate`. Both
        models run in eval mode."""
        was_training = self.encoder.training
        self.encoder.eval()  # (deterministic hashing, no dropout: the decoder samples in eval mode too)
        try:
            with torch.no_grad():
                dec, rest = self._decoder_kwargs(seq_in, kwargs)
        finally:
            self.encoder.train(was_training)
        return self._wrapped_decoder().generate(seq_out_start, seq_len, **dec, **rest)


@functools.cache
def _compiled_decode_token(backend: bool | str | Callable) -> Callable:
    """:meth:`ReformerLM._decode_token` compiled once per backend (``True``: Inductor); Dynamo's
    guards tell models and cache layouts apart."""
    return torch.compile(ReformerLM._decode_token, backend="inductor" if backend is True else backend, fullgraph=True)
