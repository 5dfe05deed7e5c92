"""Hugging Face ``transformers`` Reformer checkpoints <-> :class:`~reformer.model.ReformerLM`.

``from_transformers`` turns a ``ReformerModelWithLMHead`` (causal) or ``ReformerForMaskedLM``
(bidirectional), or a directory holding one, into a ``ReformerLM`` that computes the same
eval-mode logits; ``to_transformers`` goes back. Their architecture is expressed by ordinary
config fields (:data:`TRANSFORMERS_LAYOUT`: classic causal chunks, per-head rotations, halves
concatenated at the output, unit keys with unscaled queries, a pad bucket, Hugging Face's
factorised bucket order, separate-q/k/v local layers, padding to the chunk lcm).

Their self-logit -1e5 and their way of weighting hash rounds are reproduced too
(``self_attn_value``, ``exp_lse_softmax``): where a position sees only itself, their
weights ``exp(x - logsumexp(x))`` at x ~ -1e5 do not sum to one in fp32, which shows in the
logits.
Not reproduced, by design: training-mode dropout placement (eval outputs are identical),
their incremental-decoding cache, their hidden-key logit -1e9 (ours is the dtype's most
negative value: both give zero weight) and their fp16 self-logit -1e3 (fp16 uses -5e4). With
``hash_seed=None`` Hugging Face draws new rotations at every forward, so its eval outputs are
random; our converted model fixes one seed per layer instead.

Needs the optional dependency: ``pip install 'reformer-torch[interop]'``.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from . import hub
from .config import ReformerConfig
from .hashing import buckets_for_length
from .heads import ReformerForMaskedLM, ReformerForSequenceClassification
from .model import ReformerLM

#: Our config fields whose values Hugging Face's architecture fixes. ``from_transformers``
#: sets them; ``to_transformers`` accepts only models built with them, e.g.
#: ``ReformerLM(**TRANSFORMERS_LAYOUT, dim=256, ...)``.
TRANSFORMERS_LAYOUT: dict[str, Any] = {
    "residual": "reversible",
    "strict_causal": False,
    "random_rotations_per_head": True,
    "reversible_output": "concat",
    "attn_out_bias": False,
    "qk_logit_scale": 1.0,
    "pad_bucket": True,
    "n_buckets_first_major": False,
    "self_attn_value": -1e5,
    "exp_lse_softmax": True,
    "local_qkv": True,
    "pad_to_chunk_multiple": True,
    "emb_dim": None,
    "weight_tie": False,
    "weight_tie_embedding": False,
    "twin_attention": False,
    "use_scale_norm": False,
    "use_rezero": False,
    "ff_glu": False,
    "num_mem_kv": 0,
    "n_local_attn_heads": 0,
    "allow_duplicate_attention": True,
    "attend_across_buckets": True,
    "use_full_attn": False,
    "full_attn_thres": None,
    "cross_attention": False,
    "return_embeddings": False,
    "layer_dropout": 0.0,
}

#: Their ``hidden_act`` -> our ``ff_activation``.
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu"}

#: Rows indexed by token id: dropped by ``byte_vocab`` (ids 0, 1 are special; byte b is id b + 2).
VOCAB_KEYS = ("reformer.embeddings.word_embeddings.weight", "lm_head.decoder.weight", "lm_head.decoder.bias")
BYTE_OFFSET = 2


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "reformer.convert needs Hugging Face transformers: pip install 'reformer-torch[interop]'"
        ) from None
    return transformers


def _unsupported(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"cannot convert: {field}={value!r}; supported: {allowed}")


def config_from_transformers(hf: Any) -> ReformerConfig:
    """Our config for a ``transformers.ReformerConfig``; a ValueError names any field of
    theirs that we cannot represent."""
    kinds = tuple(hf.attn_layers)
    if not kinds or set(kinds) - {"lsh", "local"}:
        raise _unsupported("attn_layers", list(kinds), "a non-empty list of 'lsh' and 'local'")
    if "lsh" in kinds and (hf.lsh_num_chunks_before, hf.lsh_num_chunks_after) != (1, 0):
        raise _unsupported("lsh_num_chunks_before/after", (hf.lsh_num_chunks_before, hf.lsh_num_chunks_after), "(1, 0)")
    if hf.hidden_act not in ACTIVATIONS:
        raise _unsupported("hidden_act", hf.hidden_act, ", ".join(ACTIVATIONS))
    if hf.feed_forward_size % hf.hidden_size:
        raise _unsupported("feed_forward_size", hf.feed_forward_size, f"a multiple of hidden_size={hf.hidden_size}")
    if hf.axial_pos_embds and len(hf.axial_pos_shape) != 2:
        raise _unsupported("axial_pos_shape", list(hf.axial_pos_shape), "two factors")
    num_buckets = hf.num_buckets if hf.num_buckets is None or isinstance(hf.num_buckets, int) else tuple(hf.num_buckets)
    if num_buckets is None and "lsh" in kinds:
        num_buckets = _transformers_num_buckets(hf.max_position_embeddings, hf.lsh_attn_chunk_length)
        warnings.warn(
            f"num_buckets is not set in the transformers config: the converted model uses n_buckets={num_buckets}, "
            f"what transformers chooses at its first forward on max_position_embeddings="
            f"{hf.max_position_embeddings} tokens (it would choose another value for a shorter first input)",
            stacklevel=3,
        )
    return ReformerConfig(
        **TRANSFORMERS_LAYOUT,
        position_emb="axial" if hf.axial_pos_embds else "absolute",
        axial_position_shape=tuple(hf.axial_pos_shape) if hf.axial_pos_embds else None,
        axial_position_dims=tuple(hf.axial_pos_embds_dim) if hf.axial_pos_embds else None,
        num_tokens=hf.vocab_size,
        dim=hf.hidden_size,
        depth=len(kinds),
        attn_layers=kinds,
        max_seq_len=hf.max_position_embeddings,
        heads=hf.num_attention_heads,
        dim_head=hf.attention_head_size,
        bucket_size=hf.lsh_attn_chunk_length or hf.local_attn_chunk_length,
        n_hashes=hf.num_hashes,
        n_buckets=num_buckets,
        hash_seed=hf.hash_seed,
        causal=bool(hf.is_decoder),
        local_chunk_size=hf.local_attn_chunk_length,
        local_chunks_before=hf.local_num_chunks_before,
        local_chunks_after=hf.local_num_chunks_after,
        ff_mult=hf.feed_forward_size // hf.hidden_size,
        ff_activation=ACTIVATIONS[hf.hidden_act],
        norm_eps=hf.layer_norm_eps,
        lsh_dropout=hf.lsh_attention_probs_dropout_prob or 0.0,
        post_attn_dropout=hf.hidden_dropout_prob,
        ff_dropout=hf.hidden_dropout_prob,
    )


def _transformers_num_buckets(length: int, chunk_length: int) -> int | tuple[int, int]:
    """The ``num_buckets`` transformers sets at the first forward of an LSH layer whose config
    leaves it unset, on ``length`` tokens (``ReformerLSHAttention._set_num_buckets``): about
    ``2 * length / chunk_length`` rounded down to a power of two, factorised in two when above
    ``2 * max(sqrt(max_position_embeddings / chunk_length), chunk_length)``."""
    if length < 2 * chunk_length:
        raise _unsupported("num_buckets", None, f"an even int or a list of even ints (with max_position_embeddings="
                           f"{length} < 2 * lsh_attn_chunk_length transformers' rule gives no even count)")  # fmt: skip
    power = (2 * (length // chunk_length)).bit_length() - 1
    limit = 2 * max(int((length // chunk_length) ** 0.5), chunk_length)
    if 2**power > limit:
        return (2 ** (power // 2), 2 ** (power - power // 2))
    return 2**power


def config_to_transformers(model: ReformerLM) -> Any:
    """The ``transformers.ReformerConfig`` of ``model``; a ValueError names any field of ours
    that their architecture cannot express."""
    cfg = model.config
    for field, required in TRANSFORMERS_LAYOUT.items():
        if getattr(cfg, field) != required:
            raise _unsupported(field, getattr(cfg, field), f"{required!r} (see reformer.convert.TRANSFORMERS_LAYOUT)")
    kinds = cfg.layer_kinds()
    if "full" in kinds:
        raise _unsupported("attn_layers", cfg.attn_layers, "'lsh' and 'local' layers")
    if cfg.ff_activation not in ACTIVATIONS.values():
        raise _unsupported("ff_activation", cfg.ff_activation, "relu, gelu, silu")
    positions: dict[str, Any] = {"axial_pos_embds": False}
    if cfg.position_emb not in ("axial", "absolute"):
        raise _unsupported("position_emb", cfg.position_emb, "'axial' or 'absolute'")
    if cfg.position_emb == "axial":
        if len(model.pos_emb.shape) != 2:
            raise _unsupported("axial_position_shape", cfg.axial_position_shape, "two factors")
        shape, dims = model.pos_emb.shape, model.pos_emb.dims
        positions = {"axial_pos_embds": True, "axial_pos_shape": list(shape), "axial_pos_embds_dim": list(dims)}
    n_buckets = cfg.n_buckets
    if n_buckets is None and "lsh" in kinds:  # what our LSH layers derived from max_seq_len
        n_buckets = buckets_for_length(cfg.max_seq_len, cfg.bucket_size)
    return _transformers().ReformerConfig(
        vocab_size=cfg.num_tokens,
        hidden_size=cfg.dim,
        attn_layers=kinds,
        max_position_embeddings=cfg.max_seq_len,
        num_attention_heads=cfg.heads,
        attention_head_size=model.reformer.blocks[0].f.fn.dim_head,
        lsh_attn_chunk_length=cfg.bucket_size,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        local_attn_chunk_length=cfg.chunk_length("local"),
        local_num_chunks_before=cfg.local_chunks_before,
        local_num_chunks_after=cfg.local_chunks_after,
        num_hashes=cfg.n_hashes,
        num_buckets=list(n_buckets) if isinstance(n_buckets, tuple) else n_buckets,
        hash_seed=cfg.hash_seed,
        is_decoder=cfg.causal,
        feed_forward_size=cfg.dim * cfg.ff_mult,
        hidden_act=cfg.ff_activation,
        layer_norm_eps=cfg.norm_eps,
        **positions,
        hidden_dropout_prob=cfg.ff_dropout,
        lsh_attention_probs_dropout_prob=cfg.lsh_dropout,
        local_attention_probs_dropout_prob=cfg.lsh_dropout,
    )


#: Parameter names inside block ``i`` (ours ``reformer.blocks.i.*``, theirs
#: ``reformer.encoder.layers.i.*``): the attention projections of each kind, then the rest.
PROJECTIONS = {
    "lsh": {"f.fn.toqk.weight": "query_key", "f.fn.tov.weight": "value"},
    "local": {"f.fn.to_q.weight": "query", "f.fn.to_k.weight": "key", "f.fn.to_v.weight": "value"},
}
BLOCK_NAMES = {
    "f.fn.to_out.weight": "attention.output.dense.weight",
    "f.norm.weight": "attention.layer_norm.weight",
    "f.norm.bias": "attention.layer_norm.bias",
    "g.norm.weight": "feed_forward.layer_norm.weight",
    "g.norm.bias": "feed_forward.layer_norm.bias",
    "g.fn.w1.weight": "feed_forward.dense.dense.weight",
    "g.fn.w1.bias": "feed_forward.dense.dense.bias",
    "g.fn.w2.weight": "feed_forward.output.dense.weight",
    "g.fn.w2.bias": "feed_forward.output.dense.bias",
}


def weight_names(cfg: ReformerConfig) -> list[tuple[str, str]]:
    """``(our name, their name)`` of every parameter."""
    if cfg.position_emb == "absolute":
        pos = [("pos_emb.emb.weight", "reformer.embeddings.position_embeddings.embedding.weight")]
    else:
        pos = [(f"pos_emb.weights.{i}", f"reformer.embeddings.position_embeddings.weights.{i}") for i in range(2)]
    names = [("token_emb.weight", "reformer.embeddings.word_embeddings.weight"), *pos]
    for i, kind in enumerate(cfg.layer_kinds()):
        block = {ours: f"attention.self_attention.{theirs}.weight" for ours, theirs in PROJECTIONS[kind].items()}
        block.update(BLOCK_NAMES)
        names += [
            (f"reformer.blocks.{i}.{ours}", f"reformer.encoder.layers.{i}.{theirs}") for ours, theirs in block.items()
        ]
    names += [
        ("norm.weight", "reformer.encoder.layer_norm.weight"),
        ("norm.bias", "reformer.encoder.layer_norm.bias"),
        ("to_logits.weight", "lm_head.decoder.weight"),
        ("to_logits.bias", "lm_head.decoder.bias"),
    ]
    return names


@torch.no_grad()
def _copy(src: dict[str, torch.Tensor], dst: torch.nn.Module, pairs: list[tuple[str, str]]) -> None:
    """``dst``'s parameter ``b`` <- ``src[a]`` for each pair (axial weights change shape only);
    every parameter of ``dst`` must be covered."""
    params = dict(dst.named_parameters())
    missing = set(params) - {b for _, b in pairs}
    if missing:
        raise RuntimeError(f"conversion table misses {sorted(missing)}")
    for a, b in pairs:
        params[b].copy_(src[a].reshape(params[b].shape))


def _load_transformers(path: Path) -> Any:
    tf = _transformers()
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path} (expected a transformers Reformer checkpoint directory)")
    hf_config = tf.AutoConfig.from_pretrained(path)
    if hf_config.model_type != "reformer":
        raise ValueError(f"{path} holds a {hf_config.model_type!r} model, not a Reformer")
    config_from_transformers(hf_config)  # refuse before loading the weights
    if "ReformerForSequenceClassification" in (hf_config.architectures or ()):
        cls = tf.ReformerForSequenceClassification
    else:
        cls = tf.ReformerModelWithLMHead if hf_config.is_decoder else tf.ReformerForMaskedLM
    try:  # transformers reads a pytorch_model.bin with torch.load(weights_only=True): code is refused
        return cls.from_pretrained(path)
    except pickle.UnpicklingError:
        raise ValueError(f"refusing to load the weights in {path}: they hold objects other than tensors "
                         "(a pickle that could run code)") from None  # fmt: skip


#: Hugging Face's classification head: ours ``classifier.*`` has the same names.
CLASSIFIER_NAMES = [(f"classifier.{name}", f"classifier.{name}") for name in
                    ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")]  # fmt: skip
LM_HEAD_NAMES = {"to_logits.weight", "to_logits.bias"}


def _names_for(model: Any, cfg: ReformerConfig) -> list[tuple[str, str]]:
    """``(our name, their name)`` of every parameter of ``model`` (a ``ReformerLM`` or a
    ``ReformerForSequenceClassification``)."""
    names = weight_names(cfg)
    if isinstance(model, ReformerForSequenceClassification):
        return [pair for pair in names if pair[0] not in LM_HEAD_NAMES] + CLASSIFIER_NAMES
    return names


def from_transformers(model_or_dir: Any, *, byte_vocab: bool = False) -> ReformerLM | ReformerForSequenceClassification:
    """Ours (eval mode, config in ``.config``) for a ``transformers`` model or a directory saved
    from one: ``ReformerModelWithLMHead`` -> :class:`ReformerLM`, ``ReformerForMaskedLM`` ->
    :class:`~reformer.heads.ReformerForMaskedLM`, ``ReformerForSequenceClassification`` ->
    :class:`~reformer.heads.ReformerForSequenceClassification` (pooling ``"first"``, as theirs).

    ``byte_vocab``: the checkpoint's tokens are bytes shifted by two special ids (as in
    ``google/reformer-enwik8``: id = byte + 2, vocab 258); keep only the 256 byte rows so that
    token id == byte value, as in our byte-level models (the two special logits are dropped);
    the model's ``vocab`` (its ``vocab.json`` once saved) then says so, with a classifier's label
    names from ``id2label``. Without it, a directory's (or repo's) tokenizer, if it has one,
    becomes the model's ``vocab`` (:class:`~reformer.data.TokenizerVocab`: the command line
    then encodes and decodes text with it).
    """
    tf = _transformers()
    hf, tokenizer = model_or_dir, None
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = hub.resolve(model_or_dir, files=hub.TRANSFORMERS_FILES)  # a Hub repo id: its files in the Hub cache
        hf = _load_transformers(path)
        tokenizer = None if byte_vocab else _tokenizer_description(path)
    ours = {
        tf.ReformerModelWithLMHead: ReformerLM,
        tf.ReformerForMaskedLM: ReformerForMaskedLM,
        tf.ReformerForSequenceClassification: ReformerForSequenceClassification,
    }.get(type(hf))
    if ours is None:
        raise TypeError("expected a ReformerModelWithLMHead, ReformerForMaskedLM or ReformerForSequenceClassification, "
                        f"got {type(hf).__name__}")  # fmt: skip
    cfg = config_from_transformers(hf.config)
    if ours is ReformerForSequenceClassification:
        dropout = hf.config.classifier_dropout
        cfg.num_labels, cfg.pooling = hf.config.num_labels, "first"
        cfg.classifier_dropout = hf.config.hidden_dropout_prob if dropout is None else dropout
    state = dict(hf.state_dict())
    if byte_vocab:
        if cfg.num_tokens != 256 + BYTE_OFFSET:
            raise _unsupported("vocab_size", cfg.num_tokens, f"{256 + BYTE_OFFSET} with byte_vocab")
        cfg.num_tokens = 256
        state.update({k: state[k][BYTE_OFFSET:] for k in VOCAB_KEYS if k in state})
    model = ours(config=cfg)
    _copy(state, model, [(theirs, mine) for mine, theirs in _names_for(model, cfg)])
    if byte_vocab or tokenizer is not None:  # our vocabulary, so the command line can read it
        model.vocab = {"kind": "byte"} if byte_vocab else {"kind": "tokenizer", "tokenizer": tokenizer}
        if ours is ReformerForSequenceClassification:  # the label names too
            model.vocab["labels"] = [hf.config.id2label[i] for i in range(cfg.num_labels)]
    return model.to(hf.dtype).eval()


def _tokenizer_description(path: Path) -> dict | None:
    """The ``tokenizer.json`` object of a transformers checkpoint directory: its own file, or the
    fast tokenizer transformers builds from a SentencePiece ``spiece.model``; None, with a
    warning when it has a tokenizer that cannot be read (the weights convert all the same)."""
    if (path / "tokenizer.json").is_file():
        return json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    if not (path / "spiece.model").is_file():
        return None
    try:
        tokenizer = _transformers().AutoTokenizer.from_pretrained(path)
        return json.loads(tokenizer.backend_tokenizer.to_str())
    except (ImportError, ValueError, OSError, AttributeError) as exc:  # no sentencepiece / protobuf, a bad file
        warnings.warn(f"{path}: its spiece.model could not be read as a tokenizer ({exc}); the converted model "
                      "has no vocabulary (pip install sentencepiece protobuf, then convert again)",
                      stacklevel=3)  # fmt: skip
        return None


def to_transformers(model: ReformerLM | ReformerForSequenceClassification) -> Any:
    """The ``transformers`` model (eval mode) computing what ``model`` computes:
    ``ReformerModelWithLMHead`` for a causal ``ReformerLM``, else ``ReformerForMaskedLM``;
    ``ReformerForSequenceClassification`` for ours (whose pooling must be ``"first"``; the label
    names of its ``vocab``, if any, become ``id2label``)."""
    tf = _transformers()
    if not isinstance(model, (ReformerLM, ReformerForSequenceClassification)):
        raise TypeError(f"expected a ReformerLM or ReformerForSequenceClassification, got {type(model).__name__}")
    hf_config = config_to_transformers(model)
    if isinstance(model, ReformerForSequenceClassification):
        if model.config.pooling != "first":
            raise _unsupported("pooling", model.config.pooling, "'first' (Hugging Face classifies the first position)")
        hf_config.num_labels, hf_config.classifier_dropout = model.config.num_labels, model.config.classifier_dropout
        labels = (model.vocab or {}).get("labels")
        if labels is not None:  # the label names, as transformers keeps them
            hf_config.id2label = dict(enumerate(labels))
            hf_config.label2id = {name: i for i, name in enumerate(labels)}
        hf = tf.ReformerForSequenceClassification(hf_config)
        pairs = _names_for(model, model.config)
    else:
        hf = (tf.ReformerModelWithLMHead if hf_config.is_decoder else tf.ReformerForMaskedLM)(hf_config)
        pairs = weight_names(model.config) + [("to_logits.bias", "lm_head.bias")]
    _copy(model.state_dict(), hf, pairs)
    return hf.to(next(model.parameters()).dtype).eval()
