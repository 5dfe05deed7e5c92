"""ReformerConfig: every model option in one place, with its default and meaning.

The model constructors accept these fields as keyword arguments (the names of
``reformer_pytorch``); checkpoints store the config as JSON next to the weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import InitVar, asdict, dataclass, fields
from pathlib import Path

from .attention.backends import check_backend
from .attention.common import SELF_ATTN_VALUE
from .checks import check_int, check_prob, resolve_dim_head
from .feedforward import check_activation
from .hashing import validate_n_buckets
from .pkm import PKM_TOPK

#: Length a causal stack without ``max_seq_len`` derives its LSH bucket count from (the default
#: ``max_seq_len``, so such a ``Reformer`` hashes as one with the default limit does).
UNBOUNDED_CAUSAL_BUCKET_LENGTH = 4096

#: Keyword names of ``reformer_pytorch`` that differ from ours: its name -> the config field.
#: How sequence classification pools a sequence into one vector (``ReformerConfig.pooling``).
POOLINGS = ("first", "last", "mean", "max")

PEER_ALIASES = {
    "lsh_allow_duplicate_attention": "allow_duplicate_attention",
    "lsh_attend_across_buckets": "attend_across_buckets",
}

#: The encodings of ``position_emb`` ...
POSITION_EMBS = ("axial", "absolute", "fixed", "rotary", "none")
#: ... and the boolean keywords (the peer's; ``rotary_emb`` ours) that choose one of them.
POSITION_FLAGS = {
    "axial_position_emb": "axial",
    "absolute_position_emb": "absolute",
    "fixed_position_emb": "fixed",
    "rotary_emb": "rotary",
}


def _check_flags(flags: dict[str, object]) -> None:
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def position_emb_from_flags(position_emb: str | None, flags: dict[str, object]) -> str:
    """The one encoding that ``position_emb`` and the boolean ``flags`` (``{keyword: True, False
    or None (not given)}``) choose together; a ValueError naming both sides of a disagreement."""
    _check_flags(flags)
    if position_emb is not None and position_emb not in POSITION_EMBS:
        raise ValueError(f"position_emb must be one of {', '.join(map(repr, POSITION_EMBS))}, got {position_emb!r}")
    chosen = [name for name, value in flags.items() if value]
    if position_emb is not None:
        for name, value in flags.items():
            if value is not None and value != (POSITION_FLAGS[name] == position_emb):
                raise ValueError(f"position_emb={position_emb!r} and {name}={value} disagree: pass position_emb alone")
        return position_emb
    if len(chosen) > 1:
        raise ValueError(f"{chosen[0]}=True and {chosen[1]}=True choose two position encodings; pass one "
                         f"(or position_emb, one of {', '.join(map(repr, POSITION_EMBS))})")  # fmt: skip
    if chosen:
        return POSITION_FLAGS[chosen[0]]
    return "none" if flags.get("axial_position_emb") is False else "axial"


def position_emb_of_saved(data: dict) -> str:
    """``position_emb`` of a config saved before the field existed, which recorded every boolean
    (``axial_position_emb`` true by default) and meant: absolute, else fixed, else rotary, else
    axial when true, else none. Rotary with absolute or fixed positions (both were applied) has
    no equivalent: a ValueError."""
    _check_flags({name: data.get(name) for name in POSITION_FLAGS})
    axial, absolute, fixed, rotary = (data.get(name) for name in POSITION_FLAGS)
    embedded = "absolute" if absolute else "fixed" if fixed else None
    if embedded and rotary:
        raise ValueError(f"this config combines {embedded}_position_emb=True with rotary_emb=True, which an "
                         "earlier version applied together; position_emb chooses one of them")  # fmt: skip
    return embedded or ("rotary" if rotary else "axial" if axial is not False else "none")


@dataclass
class ReformerConfig:
    # --- sizes ---------------------------------------------------------------------------
    num_tokens: int = 256
    """Vocabulary size (byte-level models use 256)."""
    dim: int = 512
    """Model width."""
    depth: int = 6
    """Number of reversible blocks (each: attention + feed-forward)."""
    max_seq_len: int | None = 4096
    """Longest sequence; also fixes the LSH bucket count (``max_seq_len // bucket_size``). None
    (``Reformer`` only, its default when built from keywords): no length limit; see ``n_buckets``."""
    heads: int = 8
    """Attention heads."""
    dim_head: int | None = None
    """Per-head width; default ``dim // heads``."""
    emb_dim: int | None = None
    """Token embedding width, projected to ``dim`` when smaller (factorised embedding)."""

    # --- LSH attention -------------------------------------------------------------------
    bucket_size: int = 64
    """Chunk length of LSH attention (keys per query window: two chunks)."""
    n_hashes: int = 4
    """Hashing rounds; more rounds approximate full attention better and cost linearly."""
    n_buckets: int | tuple[int, ...] | None = None
    """Buckets per round (even int, or factorised tuple like ``(64, 128)``); default from
    ``max_seq_len``. Without ``max_seq_len``: from the input length when not causal (as
    ``reformer_pytorch``), else from 4096 positions (a prefix must hash the same at every length)."""
    causal: bool = False
    """Autoregressive model."""
    strict_causal: bool = True
    """With ``causal``: a query sees only earlier keys of its own bucket (no future token can
    move chunk boundaries). False: classic trax / Hugging Face chunk semantics."""
    allow_duplicate_attention: bool = True
    """False: correct logits by ``-log N_ij`` for keys seen in several rounds/chunks."""
    attend_across_buckets: bool = True
    """False: mask keys of other buckets inside the chunk window."""
    random_rotations_per_head: bool = False
    """A separate random rotation per head."""
    hash_seed: int | None = None
    """Seed of eval-mode rotations (default: drawn at construction, saved with the model)."""
    attn_backend: str = "auto"
    """LSH attention implementation: ``"auto"`` (chunked on CPU, a fused kernel on CUDA when the
    options allow), ``"chunked"``, ``"triton"`` or ``"flex"`` (see ``reformer.attention.backends``)."""
    attn_chunks: int = 1
    """Process attention over ``batch * heads`` in this many chunks (memory); None is 1."""
    num_mem_kv: int = 0
    """Learned memory key/values every query may attend to."""
    n_local_attn_heads: int = 0
    """Heads using local (sliding-block) attention instead of LSH."""
    use_full_attn: bool = False
    """Use dense shared-QK attention everywhere (for comparison)."""
    attn_layers: tuple[str, ...] | None = None
    """Attention kind per layer, ``"lsh"``, ``"local"`` or ``"full"``, cycled over the depth,
    e.g. ``("local", "lsh")``; default all ``"lsh"``."""
    shared_qk: bool = True
    """``"full"`` layers: keys are the queries' unit vectors (the Reformer's shared-QK attention,
    which LSH layers always use). False: separate query and key projections, plain dense
    attention (``scaled_dot_product_attention``), as in a standard Transformer; only for models
    without LSH layers, rotary positions, memory key/values or local heads."""
    residual: str = "reversible"
    """``"reversible"``: RevNet blocks ``y1 = x1 + Attn(x2)``, ``y2 = x2 + FF(y1)`` (the Reformer).
    ``"standard"``: the ordinary pre-norm residual stack ``x + Attn(x)``, ``x + FF(x)``, with
    every activation stored for the backward (a Transformer baseline, paper Fig. 3)."""
    full_attn_thres: int | None = None
    """Use dense attention for inputs at most this long (default ``bucket_size``)."""
    lsh_dropout: float = 0.0
    """Dropout on LSH attention weights."""
    post_attn_dropout: float = 0.0
    """Dropout on the attention output."""

    cross_attention: bool = False
    """Decoder blocks: attend to an encoder output (``context=``) before the feed-forward."""

    # --- feed-forward and blocks ---------------------------------------------------------
    ff_mult: int = 4
    """Feed-forward hidden width is ``dim * ff_mult``."""
    ff_chunks: int = 1
    """Split the feed-forward along the sequence into this many chunks (memory)."""
    ff_activation: str | type = "gelu"
    """Feed-forward activation: ``gelu``, ``relu``, ``silu``, or a ``torch.nn`` class (``nn.LeakyReLU``,
    stored by name) built with no arguments."""
    ff_glu: bool = False
    """Gated linear unit in the feed-forward."""
    ff_dropout: float = 0.0
    """Dropout inside the feed-forward."""
    layer_dropout: float = 0.0
    """Probability of skipping a whole block in training (stochastic depth)."""
    weight_tie: bool = False
    """Share one block's parameters across all depths."""
    pkm_layers: tuple[int, ...] = ()
    """Layer numbers (1-based) whose feed-forward is a product-key memory (``reformer.pkm``)."""
    pkm_num_keys: int = 128
    """Keys per half-key set of each product-key memory (``pkm_num_keys ** 2`` memory slots)."""
    one_value_head: bool = False
    """One value projection shared by every head (multi-query attention, Shazeer 2019)."""
    twin_attention: bool = False
    """Both reversible branches are attention (no feed-forward)."""
    use_scale_norm: bool = False
    """ScaleNorm instead of LayerNorm."""
    use_rezero: bool = False
    """ReZero residual scaling instead of normalisation."""
    reverse_thres: int = 0
    """Below this length run the plain (non-reversible) stack, which is faster."""

    # --- positions and output ------------------------------------------------------------
    position_emb: str | None = None
    """How the model knows positions: ``"axial"`` (learned axial embeddings, the paper's; the
    default), ``"absolute"`` (learned, one per position), ``"fixed"`` (sinusoidal), ``"rotary"``
    (queries/keys rotated by position, in every attention layer) or ``"none"``. The peer's
    boolean keywords ``axial_position_emb``, ``absolute_position_emb``, ``fixed_position_emb``
    and ``rotary_emb`` are accepted instead (``axial_position_emb=False`` alone: ``"none"``);
    two that disagree are refused."""
    axial_position_emb: InitVar[bool | None] = None
    absolute_position_emb: InitVar[bool | None] = None
    fixed_position_emb: InitVar[bool | None] = None
    rotary_emb: InitVar[bool | None] = None
    axial_position_shape: tuple[int, ...] | None = None
    """Axial factorisation of the positions; default ``(ceil(max_seq_len / bucket_size), bucket_size)``."""
    axial_position_dims: tuple[int, ...] | None = None
    """Width of each axial part (summing to ``emb_dim``); default an even split."""
    weight_tie_embedding: bool = False
    """Tie the output projection to the token embedding."""
    return_embeddings: bool = False
    """Return final hidden states instead of logits."""
    num_labels: int = 2
    """Sequence classification (:mod:`reformer.heads`): number of classes."""
    pooling: str = "first"
    """Sequence classification: the one vector of a sequence - its ``"first"`` position (Hugging
    Face), its ``"last"`` real position (for causal models), the ``"mean"`` or the ``"max"`` over
    its real positions (``input_mask``)."""
    classifier_dropout: float = 0.0
    """Sequence classification: dropout before and inside the classifier."""

    # --- layout details of trax / Hugging Face checkpoints (see reformer.convert) --------
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm (Hugging Face: ``layer_norm_eps``, 1e-12)."""
    reversible_output: str = "mean"
    """How the two reversible halves leave the stack: ``"mean"`` (``reformer_pytorch``) or
    ``"concat"`` (trax / Hugging Face: width ``2 * dim``, normed and projected as such)."""
    attn_out_bias: bool = True
    """Bias in the attention output projection (Hugging Face has none)."""
    qk_logit_scale: float | None = None
    """Scale of shared-QK logits ``q . k / |k|``; default ``dim_head ** -0.5``. trax and Hugging
    Face use 1.0 (unit keys, unscaled queries)."""
    pad_bucket: bool = False
    """LSH: positions hidden by ``input_mask`` are hashed into an extra last bucket, as in trax /
    Hugging Face, so padding never shares chunks with real tokens."""
    n_buckets_first_major: bool = True
    """Factorised ``n_buckets``: the first factor is the most significant digit of the combined
    bucket id; False: the least significant (Hugging Face)."""
    self_attn_value: float = SELF_ATTN_VALUE
    """LSH: logit of a query's own key, seen only when nothing else is (Hugging Face: -1e5 in
    fp32). fp16 always uses -5e4."""
    exp_lse_softmax: bool = False
    """LSH: attention and hash-round weights computed as ``exp(x - logsumexp(x))`` like trax /
    Hugging Face instead of a normalised softmax - equal but for fp32 rounding, which shows
    where a query sees only itself (logits ~ ``self_attn_value``)."""
    local_qkv: bool = False
    """``"local"`` layers use separate query/key/value projections and plain scaled dot-product
    attention in blocks of ``local_chunk_size`` (trax / Hugging Face), with no self-masking,
    instead of shared-QK local attention."""
    local_chunk_size: int | None = None
    """With ``local_qkv``: block length of local attention (default ``bucket_size``)."""
    local_chunks_before: int = 1
    """With ``local_qkv``: blocks each block looks back to (the first wraps to the last, masked
    when causal)."""
    local_chunks_after: int = 0
    """With ``local_qkv``: blocks each block looks ahead to (must be 0 when causal)."""
    pad_to_chunk_multiple: bool = False
    """Pad inputs longer than the shortest attention chunk (masked) to a multiple of the least
    common multiple of the layers' chunk lengths, as Hugging Face does; the output drops the
    padding. Needed to reproduce its outputs when LSH and local chunks differ."""

    def __post_init__(
        self,
        axial_position_emb: bool | None,
        absolute_position_emb: bool | None,
        fixed_position_emb: bool | None,
        rotary_emb: bool | None,
    ) -> None:
        flags = dict(zip(POSITION_FLAGS, (axial_position_emb, absolute_position_emb, fixed_position_emb, rotary_emb),
                         strict=True))  # fmt: skip
        self.position_emb = position_emb_from_flags(self.position_emb, flags)
        # reformer_pytorch's spellings, normalised before the type checks: attn_chunks=None,
        # pkm_layers as one int, ff_activation as None or a torch.nn class
        if self.attn_chunks is None:
            self.attn_chunks = 1
        if isinstance(self.pkm_layers, int) and not isinstance(self.pkm_layers, bool):
            self.pkm_layers = (self.pkm_layers,)
        self.ff_activation = check_activation(self.ff_activation)
        self._check_field_types()
        for name in ("num_tokens", "dim", "depth", "heads", "bucket_size", "n_hashes", "attn_chunks",
                     "ff_mult", "ff_chunks", "pkm_num_keys"):  # fmt: skip
            check_int(name, getattr(self, name), 1)
        if self.max_seq_len is not None:
            check_int("max_seq_len", self.max_seq_len, 1)
        self._check_pkm_layers()
        for name in ("num_mem_kv", "n_local_attn_heads", "reverse_thres"):
            check_int(name, getattr(self, name), 0)
        check_int("num_labels", self.num_labels, 2)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}; got {self.pooling!r}")
        for name in ("lsh_dropout", "post_attn_dropout", "ff_dropout", "layer_dropout", "classifier_dropout"):
            check_prob(name, getattr(self, name))
        resolve_dim_head(self.dim, self.heads, self.dim_head)
        if self.n_local_attn_heads > self.heads:
            raise ValueError(f"n_local_attn_heads must be in [0, heads={self.heads}], got {self.n_local_attn_heads}")
        if self.n_buckets is not None:
            self.n_buckets = validate_n_buckets(self.n_buckets)
        for name in ("axial_position_shape", "axial_position_dims", "attn_layers"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        if self.attn_layers is not None:
            bad = [k for k in self.attn_layers if k not in ("lsh", "local", "full")]
            if not self.attn_layers or bad:
                raise ValueError(
                    f"attn_layers must be a non-empty tuple of 'lsh', 'local', 'full'; got {self.attn_layers!r}"
                )
        if self.emb_dim is not None:
            check_int("emb_dim", self.emb_dim, 1)
        check_backend(self.attn_backend)
        if self.hash_seed is not None and not -(2**63) <= self.hash_seed < 2**63:
            raise ValueError(f"hash_seed must be an int64 (or None), got {self.hash_seed!r}")
        shape, length = self.axial_position_shape, self.max_seq_len
        if self.position_emb == "axial" and shape is not None and length is not None and math.prod(shape) < length:
            raise ValueError(f"axial_position_shape {shape} has {math.prod(shape)} positions, "
                             f"fewer than max_seq_len={self.max_seq_len}")  # fmt: skip
        self._check_compat_fields()
        self._check_ablation_fields()

    def _check_pkm_layers(self) -> None:
        layers = self.pkm_layers
        valid = isinstance(layers, (tuple, list)) and all(
            isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= self.depth for n in layers
        )
        if not valid:
            raise ValueError(f"pkm_layers must be layer numbers in [1, depth={self.depth}], got {self.pkm_layers!r}")
        self.pkm_layers = tuple(layers)
        if self.pkm_layers and self.pkm_num_keys < PKM_TOPK:
            raise ValueError(f"pkm_num_keys must be >= {PKM_TOPK} (each memory reads its best {PKM_TOPK} slots), "
                             f"got {self.pkm_num_keys}")  # fmt: skip
        if self.pkm_layers and self.twin_attention:
            raise ValueError("pkm_layers replace feed-forwards, which twin_attention=True does not have")

    def bucket_length(self) -> int | None:
        """Length the LSH bucket count derives from when ``n_buckets`` is not given: ``max_seq_len``;
        without it, the input length (None) for a bidirectional stack, but a fixed 4096 for a causal
        one, whose outputs at a position must not depend on how long the sequence is."""
        if self.max_seq_len is not None or not self.causal:
            return self.max_seq_len
        return UNBOUNDED_CAUSAL_BUCKET_LENGTH

    def _check_field_types(self) -> None:
        """Each field holds a value of its declared type: a config read from JSON can hold any
        type anywhere (``"false"`` would be a true ``causal``), and floats must be finite."""
        for f in fields(self):
            value, allowed = getattr(self, f.name), f.type.split(" | ")
            if value is None:
                ok = "None" in allowed
            elif isinstance(value, bool):
                ok = "bool" in allowed
            elif isinstance(value, int):
                ok = "int" in allowed or "float" in allowed
            elif isinstance(value, float):
                ok = "float" in allowed and math.isfinite(value)
            elif isinstance(value, str):
                ok = "str" in allowed
            elif isinstance(value, type):
                ok = "type" in allowed
            else:
                ok = isinstance(value, (tuple, list)) and any(a.startswith("tuple") for a in allowed)
            if not ok:
                expected = " or ".join("True or False" if a == "bool" else a for a in allowed)
                finite = " (finite)" if "float" in allowed else ""
                raise ValueError(f"{f.name} must be {expected}{finite}, got {value!r}")

    def _check_ablation_fields(self) -> None:
        if self.residual not in ("reversible", "standard"):
            raise ValueError(f"residual must be 'reversible' or 'standard', got {self.residual!r}")
        if self.residual == "standard" and self.reversible_output != "mean":
            raise ValueError("reversible_output='concat' needs residual='reversible' (a standard stack has one stream)")
        if not isinstance(self.shared_qk, bool):
            raise ValueError(f"shared_qk must be True or False, got {self.shared_qk!r}")
        if self.shared_qk:
            return
        conflicts = {
            "attn_layers": "lsh" in self.layer_kinds(),
            "position_emb": self.position_emb == "rotary",
            "num_mem_kv": self.num_mem_kv > 0,
            "n_local_attn_heads": self.n_local_attn_heads > 0,
        }
        for name, conflict in conflicts.items():
            if conflict:
                value = self.layer_kinds() if name == "attn_layers" else getattr(self, name)
                raise ValueError(
                    f"shared_qk=False (separate-QK dense layers) does not combine with {name}={value!r}: "
                    "LSH layers, rotary positions, memory key/values and local heads need shared-QK attention"
                )

    def _check_compat_fields(self) -> None:
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be a number > 0, got {self.norm_eps!r}")
        if isinstance(self.self_attn_value, bool) or not isinstance(self.self_attn_value, (int, float)):
            raise ValueError(f"self_attn_value must be a number, got {self.self_attn_value!r}")
        if self.reversible_output not in ("mean", "concat"):
            raise ValueError(f"reversible_output must be 'mean' or 'concat', got {self.reversible_output!r}")
        scale = self.qk_logit_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
            raise ValueError(f"qk_logit_scale must be a number > 0 or None, got {scale!r}")
        if self.local_chunk_size is not None:
            check_int("local_chunk_size", self.local_chunk_size, 1)
        check_int("local_chunks_before", self.local_chunks_before, 0)
        check_int("local_chunks_after", self.local_chunks_after, 0)
        if self.causal and self.local_qkv and self.local_chunks_after:
            raise ValueError(f"local_chunks_after must be 0 for a causal model, got {self.local_chunks_after}")

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """``{field: one-line doc}``, read from the attribute docstrings above."""
        import ast
        import inspect

        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        docs = {}
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
        return docs

    @property
    def model_emb_dim(self) -> int:
        """Token embedding width (``emb_dim``, default ``dim``)."""
        return self.emb_dim or self.dim

    def layer_kinds(self) -> list[str]:
        """Attention kind of each of the ``depth`` layers."""
        pattern = self.attn_layers or ("full" if self.use_full_attn else "lsh",)
        return [pattern[i % len(pattern)] for i in range(self.depth)]

    def chunk_length(self, kind: str) -> int | None:
        """Chunk (block) length of an attention layer of ``kind``; None for ``"full"``."""
        if kind == "lsh":
            return self.bucket_size
        if kind == "local":
            return (self.local_chunk_size or self.bucket_size) if self.local_qkv else 2 * self.bucket_size
        return None

    def to_dict(self) -> dict:
        if not isinstance(self.ff_activation, str):
            raise ValueError(
                f"ff_activation={self.ff_activation!r} is not a torch.nn class and cannot be saved; "
                "use a name (gelu, relu, silu) or a torch.nn activation class"
            )
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ReformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - set(POSITION_FLAGS))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; allowed: {sorted(known)}")
        if "position_emb" not in data and set(data) & set(POSITION_FLAGS):  # saved before position_emb
            saved = position_emb_of_saved(data)
            data = {k: v for k, v in data.items() if k not in POSITION_FLAGS} | {"position_emb": saved}
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ReformerConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _reads_position_flag(kind: str) -> property:
    return property(lambda self: self.position_emb == kind, doc=f"``position_emb == {kind!r}`` (read-only)")


# The boolean keywords are constructor arguments only (InitVar); reading one answers from
# position_emb (the class attribute dataclass leaves would be the keyword's default, None).
for _name, _kind in POSITION_FLAGS.items():
    setattr(ReformerConfig, _name, _reads_position_flag(_kind))
