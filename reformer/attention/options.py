"""LSHOptions: every option of LSH attention in one frozen object, built once and passed down.

The model builds it from its config (:meth:`LSHOptions.from_config`); the public layers
(:class:`~reformer.attention.lsh.LSHAttention`, :class:`~reformer.attention.self_attention.LSHSelfAttention`)
build it from their ``reformer_pytorch`` keywords. Each option has one name, the config's;
a new option is a field here (plus a config field of the same name) and the code that reads it.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Any

from ..checks import check_int, check_prob
from ..hashing import BucketSpec, buckets_for_length, validate_n_buckets
from .backends import check_backend
from .common import SELF_ATTN_VALUE


@dataclass(frozen=True)
class LSHOptions:
    bucket_size: int = 64
    """Chunk length; each query attends within its chunk and the previous one."""
    n_hashes: int = 8
    """Hashing rounds, combined by their log-sum-exp."""
    n_buckets: BucketSpec | None = None
    """Buckets per round: an even int or a factorised tuple. Default: from ``max_seq_len``, or
    else from the input length."""
    max_seq_len: int | None = None
    """The longest sequence the layer sees; fixes ``n_buckets`` so hashing never depends on length."""
    causal: bool = False
    """Autoregressive masking (see ``strict_causal``)."""
    strict_causal: bool = True
    """With ``causal``: a query sees only earlier keys of its own bucket (at most ``bucket_size``),
    so no later token can change its output. False: trax / Hugging Face chunk semantics."""
    lsh_dropout: float = 0.0
    """Dropout on the attention weights (training only)."""
    allow_duplicate_attention: bool = True
    """False: subtract ``log N_ij`` from each logit (``N_ij``: windows in which i sees j)."""
    attend_across_buckets: bool = True
    """False: keys of other buckets (or rounds) in the window are masked too."""
    random_rotations_per_head: bool = False
    """A separate random rotation per head instead of one shared."""
    rehash_each_round: bool = True
    """True: a fresh rotation per round. False (``reformer_pytorch``): one rotation, and each
    position goes to its ``n_hashes`` best buckets, one per round."""
    drop_for_hash_rate: float = 0.0
    """In training, dropout on the vectors that are hashed (not on those attended with)."""
    return_attn: bool = False
    """Also return the dense ``(rows, len, len)`` attention (costly)."""
    hash_seed: int | None = None
    """Seed of the eval-mode rotations; None: drawn when the layer is built (and saved with it)."""
    pad_bucket: bool = False
    """Positions hidden by the input mask get an extra last bucket (trax / Hugging Face)."""
    n_buckets_first_major: bool = True
    """Factorised ``n_buckets``: the first factor is the most significant digit of the bucket id."""
    self_attn_value: float = SELF_ATTN_VALUE
    """Logit of a query's own key (seen only when it has no other)."""
    exp_lse_softmax: bool = False
    """Attention and round weights as ``exp(x - logsumexp(x))`` (trax / Hugging Face rounding)."""
    attn_backend: str = "auto"
    """``"auto"``, ``"chunked"``, ``"triton"`` or ``"flex"`` (see :mod:`reformer.attention.backends`)."""

    #: Options a layer takes that a model config does not have (their defaults serve models).
    LAYER_ONLY = ("rehash_each_round", "drop_for_hash_rate", "return_attn")

    def __post_init__(self) -> None:
        check_int("bucket_size", self.bucket_size, 1)
        check_int("n_hashes", self.n_hashes, 1)
        check_prob("lsh_dropout", self.lsh_dropout)
        check_prob("drop_for_hash_rate", self.drop_for_hash_rate)
        check_backend(self.attn_backend)
        if isinstance(self.self_attn_value, bool) or not isinstance(self.self_attn_value, (int, float)):
            raise ValueError(f"self_attn_value must be a number, got {self.self_attn_value!r}")
        n_buckets = self.n_buckets
        if self.max_seq_len is not None:
            check_int("max_seq_len", self.max_seq_len, 1)
            if n_buckets is None:
                n_buckets = buckets_for_length(self.max_seq_len, self.bucket_size)
        if n_buckets is not None:  # (frozen: normalised values set through object.__setattr__)
            object.__setattr__(self, "n_buckets", validate_n_buckets(n_buckets))
        if not self.rehash_each_round and self.n_buckets is not None:
            self._check_top_buckets(self.n_buckets)
        object.__setattr__(self, "self_attn_value", float(self.self_attn_value))
        # as_text: the options as one line of name=repr(value) (from_text reads it back), how they
        # travel as an operator's argument (lsh_op). Made here, so that torch.compile reads a
        # constant string even where it treats the numbers as symbols.
        text = ";".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        object.__setattr__(self, "as_text", text)

    def _check_top_buckets(self, n_buckets: BucketSpec) -> None:
        if not isinstance(n_buckets, int):
            raise ValueError(f"rehash_each_round=False needs an int n_buckets, got {n_buckets!r}")
        if n_buckets < self.n_hashes:
            raise ValueError(
                f"rehash_each_round=False puts each position in its n_hashes={self.n_hashes} best buckets, "
                f"so n_buckets must be >= n_hashes, got {n_buckets}"
            )

    @classmethod
    def from_config(cls, config: Any) -> LSHOptions:
        """The options of a model's LSH layers: each field from the config field of the same
        name; ``max_seq_len`` is the length the bucket count derives from."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in cls.LAYER_ONLY and f.name != "max_seq_len"]
        return cls(**{name: getattr(config, name) for name in names}, max_seq_len=config.bucket_length())

    @classmethod
    def from_text(cls, text: str) -> LSHOptions:
        """The options whose :attr:`as_text` is ``text``."""
        fields = dict(item.split("=", 1) for item in text.split(";"))
        return cls(**{name: _literal(value) for name, value in fields.items()})

    def replace(self, **changes: Any) -> LSHOptions:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def bucket_spec(self, length: int) -> BucketSpec:
        """The bucket count used for an input of ``length`` positions."""
        if self.n_buckets is not None:
            return self.n_buckets
        n_buckets = buckets_for_length(length, self.bucket_size)
        if not self.rehash_each_round:
            self._check_top_buckets(n_buckets)
        return n_buckets


#: The public layers' keywords that spell an option under another name (``reformer_pytorch``'s
#: ``dropout``, and the layers' own short names).
LAYER_KEYWORDS = {"dropout": "lsh_dropout", "self_value": "self_attn_value", "exp_lse": "exp_lse_softmax",
                  "backend": "attn_backend"}  # fmt: skip


def layer_options(keywords: dict[str, Any], options: LSHOptions | None) -> LSHOptions:
    """A public layer's options from its keyword arguments (``locals()`` on entering its
    ``__init__``): every option found there under its name or its :data:`LAYER_KEYWORDS` name;
    or ``options`` when given (see :func:`one_source`)."""
    fields = {f.name for f in dataclasses.fields(LSHOptions)}
    renamed = {LAYER_KEYWORDS.get(name, name): value for name, value in keywords.items()}
    return one_source(LSHOptions(**{name: value for name, value in renamed.items() if name in fields}), options)


def one_source(from_keywords: LSHOptions, options: LSHOptions | None) -> LSHOptions:
    """A layer's options: ``options`` when given - its LSH keywords must then keep their
    defaults, so that no keyword is silently ignored - else those built from the keywords."""
    if options is None:
        return from_keywords
    if not isinstance(options, LSHOptions):
        raise TypeError(f"options must be an LSHOptions, got {type(options).__name__}")
    defaults = LSHOptions()
    if from_keywords != defaults:
        changed = [
            f.name
            for f in dataclasses.fields(LSHOptions)
            if getattr(from_keywords, f.name) != getattr(defaults, f.name)
        ]
        raise TypeError(f"give the LSH options either as keywords or as options=, not both (keywords set: {changed})")
    return options


def option_property(name: str) -> property:
    """``layer.<name>`` reads the option ``name`` of ``layer.options``; assigning it replaces
    ``layer.options`` by a checked copy (e.g. ``reformer.switch`` changing ``n_hashes``)."""

    def get(layer: Any) -> Any:
        return getattr(layer.options, name)

    def set_(layer: Any, value: Any) -> None:
        layer.options = layer.options.replace(**{name: value})

    return property(get, set_, doc=f"The LSH option ``{name}`` (see :class:`LSHOptions`).")


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):  # inf, -inf and nan are no Python literals
        return float(text)
