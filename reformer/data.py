"""Training data: built-in corpora (no download), user files, enwik8, the duplication task.

``pysrc`` is the source of the running interpreter's standard library: long documents (files)
split by a hash of their path, read into one buffer (see :func:`load_pysrc`).

Text is byte-level by default (vocab 256: every file works, nothing to build); a character
vocabulary is available for text. Batches are random contiguous windows drawn from a seeded
generator whose state can be saved and restored, so a resumed run sees the same batches.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

#: The standard enwik8 split: the first 90M bytes train, the next 5M validate, the last 5M test.
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)


def builtin_text() -> str:
    """English text that ships with every CPython (the interactive help topics, ~465 KB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class ByteVocab:
    """Bytes as tokens: ``num_tokens`` 256, lossless for any file."""

    num_tokens = 256
    kind = "byte"

    def encode(self, data: str | bytes) -> torch.Tensor:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class CharVocab:
    """The distinct characters of a text, in code-point order, as tokens."""

    kind = "char"

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("a character vocabulary needs at least one character")
        self.chars = "".join(sorted(set(chars)))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.num_tokens = len(self.chars)

    def encode(self, data: str | bytes) -> torch.Tensor:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise ValueError(f"characters not in the vocabulary: {''.join(missing[:20])!r}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class WordVocab:
    """A fixed list of words as tokens, read from text separated by whitespace (ListOps'
    operators and digits)."""

    kind = "word"

    def __init__(self, words: list[str] | tuple[str, ...]):
        if not words or len(set(words)) != len(words) or any(not w or w.split() != [w] for w in words):
            raise ValueError(f"a word vocabulary needs distinct words without whitespace, got {words!r}")
        self.words = tuple(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.num_tokens = len(self.words)

    def encode(self, data: str | bytes) -> torch.Tensor:
        words = (data.decode("utf-8") if isinstance(data, bytes) else data).split()
        missing = sorted(set(words) - set(self.index))
        if missing:
            raise ValueError(f"words not in the vocabulary: {missing[:20]}")
        return torch.tensor([self.index[w] for w in words], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "words": list(self.words)}


class TokenizerVocab:
    """A Hugging Face ``tokenizers`` tokenizer (its ``tokenizer.json`` object) as tokens: the
    subword vocabulary of a model converted from ``transformers`` (e.g. the SentencePiece of
    ``google/reformer-crime-and-punishment``). Needs the ``tokenizers`` package (the ``interop``
    extra). Text is encoded without special tokens, as a language model continues it."""

    kind = "tokenizer"

    def __init__(self, tokenizer: dict):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("this model's vocabulary is a Hugging Face tokenizer: "
                              "pip install 'reformer-torch[interop]' (the tokenizers package)") from None  # fmt: skip
        self.tokenizer_json = tokenizer
        try:
            self.tokenizer = Tokenizer.from_str(json.dumps(tokenizer))
        except Exception as exc:  # tokenizers raises its own Exception subclass for a bad description
            raise ValueError(f"not a tokenizers tokenizer description: {exc}") from None
        self.num_tokens = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, data: str | bytes) -> torch.Tensor:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer": self.tokenizer_json}


Vocab = ByteVocab | CharVocab | WordVocab | TokenizerVocab


def vocab_from_dict(data: dict) -> Vocab:
    if not isinstance(data, dict):
        raise ValueError(f"unknown vocabulary description {data!r}")
    if data.get("kind") == "byte":
        return ByteVocab()
    if data.get("kind") == "char" and isinstance(data.get("chars"), str):
        return CharVocab(data["chars"])
    if data.get("kind") == "word" and isinstance(data.get("words"), list):
        return WordVocab(data["words"])
    if data.get("kind") == "tokenizer" and isinstance(data.get("tokenizer"), dict):
        return TokenizerVocab(data["tokenizer"])
    raise ValueError(f"unknown vocabulary description {data!r}")


class TextStream:
    """The text of tokens generated one at a time after ``prompt`` (token ids). A byte can end in
    the middle of a character, and a subword's spacing depends on the tokens before it, so each
    :meth:`step` returns the text now complete (maybe ``""``) and :meth:`finish` the rest.
    Subwords: the new tokens are decoded after a few tokens of context, and the text they add
    beyond that context's is what is new (as text-generation servers stream)."""

    CONTEXT = 8
    """Tokens of context decoded before the new ones."""

    def __init__(self, vocab: Vocab, prompt: torch.Tensor | list[int]):
        self.vocab = vocab
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids = [int(i) for i in prompt[-self.CONTEXT :]]
        self._read = len(self._ids)  # tokens before it are already text

    def step(self, token: int) -> str:
        if self.vocab.kind == "byte":
            return self._utf8.decode(bytes([token]))
        if self.vocab.kind != "tokenizer":
            return self.vocab.decode([token])
        self._ids.append(token)
        new = self._pending()
        if not new or new.endswith("\ufffd"):  # nothing yet, or a character still incomplete
            return ""
        self._ids, self._read = self._ids[-self.CONTEXT :], min(len(self._ids), self.CONTEXT)
        return new

    def finish(self) -> str:
        if self.vocab.kind == "byte":
            return self._utf8.decode(b"", final=True)
        return self._pending() if self.vocab.kind == "tokenizer" else ""

    def _pending(self) -> str:
        """Text of the tokens not yet returned (after their context)."""
        context = self.vocab.decode(self._ids[: self._read])
        text = self.vocab.decode(self._ids)
        return text[len(context) :]


@dataclass
class Corpus:
    """Token ids of a training and a validation split (1-D int64 tensors, or a synthetic task
    that makes its own batches) and their vocabulary."""

    name: str
    train: torch.Tensor | DuplicationTask
    valid: torch.Tensor | DuplicationTask
    vocab: Vocab


def load_corpus(spec: str, vocab: str | Vocab = "byte", valid_fraction: float = 0.05) -> Corpus:
    """``spec``: ``builtin``, ``pysrc``, a file path, or ``enwik8:PATH``. Files other than enwik8
    keep their last ``valid_fraction`` for validation; ``pysrc`` has its own split by file.
    ``vocab``: ``"byte"``, ``"char"`` (built from the text), or a vocabulary (a model's), which
    must cover the text."""
    kind = vocab if isinstance(vocab, str) else vocab.kind
    if isinstance(vocab, str) and kind not in ("byte", "char"):
        raise ValueError(f"vocab must be 'byte' or 'char', got {vocab!r}")
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
    if spec.startswith("enwik8:"):
        if kind != "byte":
            raise ValueError("enwik8 is byte-level: use vocab='byte'")
        train, valid, _ = load_enwik8(spec.split(":", 1)[1])
        return Corpus("enwik8", train, valid, ByteVocab())
    if spec == "pysrc":
        if kind != "byte":
            raise ValueError("pysrc is byte-level: use vocab='byte'")
        return pysrc_corpus(load_pysrc())
    name = "builtin" if spec == "builtin" else Path(spec).name
    if kind == "byte":  # a file is mapped, not read
        tokens = ByteVocab()
        ids = tokens.encode(builtin_text()) if spec == "builtin" else map_bytes(spec)
    else:
        text = builtin_text() if spec == "builtin" else _utf8_text(_read_file(spec), name)
        tokens = CharVocab(text) if isinstance(vocab, str) else vocab
        try:
            ids = tokens.encode(text)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc} (the model's vocabulary has {tokens.num_tokens})") from None
    split = int(len(ids) * (1 - valid_fraction))
    return Corpus(name, ids[:split], ids[split:], tokens)


def _utf8_text(raw: bytes, name: str) -> str:
    """``raw`` decoded, refusing bytes that are not UTF-8 (a character vocabulary of U+FFFD
    replacements would learn nothing of them)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start:,}); "
                         "use the byte vocabulary for binary data") from None  # fmt: skip


def _check_file(path: str) -> int:
    """The size of the data file ``path``, which must be a non-empty regular file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"data file {path} is a directory; give a file")
    if p.exists() and not p.is_file():  # reading a FIFO or a device would block or never end
        raise ValueError(f"data file {path} is not a regular file (a FIFO, socket or device); give a file")
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    size = p.stat().st_size
    if not size:
        raise ValueError(f"data file is empty: {path}")
    return size


def _read_file(path: str) -> bytes:
    _check_file(path)
    return Path(path).read_bytes()


def map_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor mapped from disk (copy-on-write): pages are read as
    windows touch them, so the file need not fit in memory (``WindowSampler`` makes int64
    windows)."""
    return torch.from_file(str(path), shared=False, size=_check_file(path), dtype=torch.uint8)


def load_enwik8(path: str, split: tuple[int, int, int] = ENWIK8_SPLIT) -> tuple[torch.Tensor, ...]:
    """The train / valid / test byte splits of an enwik8 file (``split`` sizes, in order)."""
    ids = map_bytes(path)
    if len(ids) < sum(split):
        raise ValueError(f"{path} has {len(ids):,} bytes; enwik8 has {sum(split):,} (is it the right file?)")
    return tuple(ids[: sum(split)].split(list(split)))


#: ``pysrc`` split of a file: its share of the hash space (train, valid, test; in this order).
PYSRC_SPLIT = (("train", 0.90), ("valid", 0.05), ("test", 0.05))
#: Directories of installed packages, which are not the standard library.
PYSRC_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def pysrc_root() -> Path:
    """The running interpreter's standard-library directory (``sysconfig``'s ``stdlib``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def pysrc_files(root: Path) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root`` (symbolic links not followed),
    outside :data:`PYSRC_EXCLUDED_DIRS`, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in PYSRC_EXCLUDED_DIRS]
        base = Path(folder).relative_to(root)
        found += [(base / f).as_posix() for f in files if f.endswith(".py") and (Path(folder) / f).is_file()]
    return sorted(found)


def pysrc_split_of(rel_path: str) -> str:
    """``train``, ``valid`` or ``test``: fixed by the SHA-256 of the path, not by listing order."""
    u = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big") / 2**64  # in [0, 1)
    edge = 0.0
    for name, share in PYSRC_SPLIT:
        edge += share
        if u < edge:
            return name
    return PYSRC_SPLIT[-1][0]


@dataclass
class Documents:
    """Documents stored end to end: ``tokens`` (1-D) with document ``i`` at
    ``tokens[offsets[i]:offsets[i + 1]]``; ``names`` one per document."""

    tokens: torch.Tensor
    offsets: torch.Tensor
    names: list[str]

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


@dataclass
class PySrc:
    """The stdlib corpus: one uint8 buffer holding every split, each a :class:`Documents`
    viewing its contiguous part, and the facts a result records (:meth:`metadata`)."""

    splits: dict[str, Documents]
    python_version: str
    root: str
    sha256: str

    def metadata(self) -> dict:
        counts = {name: {"files": len(d.names), "bytes": int(d.offsets[-1] - d.offsets[0])}
                  for name, d in self.splits.items()}  # fmt: skip
        return {
            "corpus": "pysrc", "python_version": self.python_version, "stdlib": self.root,
            "files": sum(c["files"] for c in counts.values()), "bytes": sum(c["bytes"] for c in counts.values()),
            "sha256": self.sha256, "splits": counts,
            "order": "files sorted by (split train/valid/test, relative path); sha256 over each file's "
                     "relative path, a NUL byte, its length as 8 bytes big-endian, then its bytes",
        }  # fmt: skip


def load_pysrc(root: str | os.PathLike | None = None) -> PySrc:
    """Read every ``.py`` file under ``root`` (default :func:`pysrc_root`) into one
    preallocated uint8 tensor, file by file (the corpus is never held twice), ordered by split
    then path; hash it on the way."""
    root = pysrc_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library directory not found: {root}")
    order = {name: i for i, (name, _) in enumerate(PYSRC_SPLIT)}
    files = sorted(pysrc_files(root), key=lambda rel: (order[pysrc_split_of(rel)], rel))
    if not files:
        raise ValueError(f"no .py files under {root}")
    sizes = [(root / rel).stat().st_size for rel in files]
    raw = bytearray(sum(sizes))  # the one copy: the tensor below shares its memory
    view = memoryview(raw)
    digest, pos = hashlib.sha256(), 0
    for rel, size in zip(files, sizes, strict=True):
        with open(root / rel, "rb") as f:
            if f.readinto(view[pos : pos + size]) != size or f.read(1):
                raise ValueError(f"{root / rel} changed while the corpus was read (size {size:,} at listing)")
        digest.update(rel.encode("utf-8") + b"\0" + size.to_bytes(8, "big"))
        digest.update(view[pos : pos + size])
        pos += size
    buffer = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    offsets = torch.tensor([0, *sizes]).cumsum(0)  # (n_files + 1,)
    splits, first = {}, 0
    for name, _ in PYSRC_SPLIT:
        last = first + sum(1 for rel in files if pysrc_split_of(rel) == name)
        start, end = int(offsets[first]), int(offsets[last])
        splits[name] = Documents(buffer[start:end], offsets[first : last + 1] - start, files[first:last])
        first = last
    version = ".".join(map(str, sys.version_info[:3]))
    return PySrc(splits, version, str(root), digest.hexdigest())


def pysrc_corpus(src: PySrc) -> Corpus:
    """The training and validation splits of ``src`` as a byte :class:`Corpus` (views of its buffer)."""
    return Corpus("pysrc", src.splits["train"].tokens, src.splits["valid"].tokens, ByteVocab())


class WindowSampler:
    """Random contiguous windows of ``seq_len + 1`` tokens (inputs and next-token targets)
    from ``data``, from a seeded generator whose state travels with checkpoints."""

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if len(data) < seq_len + 1:
            raise ValueError(f"the data has {len(data):,} tokens, too few for windows of seq_len + 1 = {seq_len + 1:,}")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        """``(batch_size, seq_len + 1)`` token ids."""
        starts = torch.randint(0, len(self.data) - self.seq_len, (self.batch_size,), generator=self.generator)
        offsets = torch.arange(self.seq_len + 1)
        return self.data[starts[:, None] + offsets].long()  # (a uint8 buffer gives int64 ids)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class DuplicationTask:
    """The paper's synthetic task: sequences ``0 w 0 w`` with ``w`` drawn from symbols
    ``1..n_symbols``; only the second copy is scored (it is predictable from the first, by
    attending back exactly ``length / 2`` positions)."""

    def __init__(self, seq_len: int, batch_size: int, n_symbols: int = 127, seed: int = 0):
        if seq_len < 4 or seq_len % 2:
            raise ValueError(f"the duplication task needs an even seq_len >= 4, got {seq_len}")
        if n_symbols < 1:
            raise ValueError(f"n_symbols must be >= 1, got {n_symbols}")
        self.seq_len, self.batch_size, self.n_symbols = seq_len, batch_size, n_symbols
        self.num_tokens = n_symbols + 1
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` ``(batch, seq_len)`` and ``scored`` ``(batch, seq_len)`` bool: True on the
        positions of the second ``w``."""
        half = self.seq_len // 2
        w = torch.randint(1, self.n_symbols + 1, (self.batch_size, half - 1), generator=self.generator)
        zero = torch.zeros(self.batch_size, 1, dtype=torch.long)
        tokens = torch.cat([zero, w, zero, w], dim=1)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, half + 1 :] = True
        return tokens, scored

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# --- ListOps (Long Range Arena) -------------------------------------------------------------

#: ListOps operators as Long Range Arena writes them (Tay et al., 2020, after Nangia and Bowman,
#: 2018): minimum, maximum, median (rounded down) and sum modulo 10 of their arguments.
LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_END = "]"
#: Token ids: 0 is padding, then the digits, the operators and the closing bracket.
LISTOPS_VOCAB = ("<pad>", *(str(d) for d in range(10)), *LISTOPS_OPERATORS, LISTOPS_END)
LISTOPS_PAD = 0
LISTOPS_CLASSES = 10


@dataclass(frozen=True)
class ListOpsSpec:
    """Long Range Arena's ListOps: each node is an operator with probability ``operator_p``
    (below ``max_depth``; the root is at depth 1) holding 2 to ``max_args`` arguments, else a
    digit; expressions are kept when their token count (operators, digits, closing brackets) is
    strictly between ``min_length`` and ``max_length``, and each is kept once."""

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000
    operator_p: float = 0.25


def listops_value(operator: str, args: list[int]) -> int:
    if operator == "[MIN":
        return min(args)
    if operator == "[MAX":
        return max(args)
    if operator == "[MED":
        ordered, mid = sorted(args), len(args) // 2
        return ordered[mid] if len(args) % 2 else (ordered[mid - 1] + ordered[mid]) // 2
    return sum(args) % 10


def _listops_node(rng, depth: int, spec: ListOpsSpec, out: list[str]) -> int | None:
    """Append one random node's tokens to ``out`` and return its value; None as soon as ``out``
    reaches ``max_length`` (the expression will be rejected: stop drawing it)."""
    if len(out) >= spec.max_length:
        return None
    if depth >= spec.max_depth or rng.random() > spec.operator_p:
        digit = rng.randrange(10)
        out.append(str(digit))
        return digit
    n_args = rng.randint(2, spec.max_args)
    operator = rng.choice(LISTOPS_OPERATORS)
    out.append(operator)
    args = []
    for _ in range(n_args):
        value = _listops_node(rng, depth + 1, spec, out)
        if value is None:
            return None
        args.append(value)
    out.append(LISTOPS_END)
    return listops_value(operator, args)


def listops_examples(n: int, seed: int = 0, spec: ListOpsSpec = ListOpsSpec()) -> list[tuple[str, int]]:
    """``n`` distinct ListOps expressions ``(tokens separated by spaces, value 0..9)`` drawn from
    ``random.Random(seed)`` by rejection on the length (as Long Range Arena generates them)."""
    import random

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 < spec.operator_p < 1 or spec.max_args < 2 or spec.max_depth < 2 or spec.min_length >= spec.max_length:
        raise ValueError(f"ListOpsSpec cannot generate expressions: {spec}")
    rng, seen, examples = random.Random(seed), set(), []
    while len(examples) < n:
        tokens: list[str] = []
        value = _listops_node(rng, 1, spec, tokens)
        text = " ".join(tokens)
        if value is not None and spec.min_length < len(tokens) < spec.max_length and text not in seen:
            seen.add(text)
            examples.append((text, value))
    return examples


def listops_tensors(examples: list[tuple[str, int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(n, seq_len)`` (right-padded with :data:`LISTOPS_PAD`) and labels ``(n,)``."""
    index = {token: i for i, token in enumerate(LISTOPS_VOCAB)}
    ids = torch.full((len(examples), seq_len), LISTOPS_PAD, dtype=torch.long)
    for row, (text, _) in enumerate(examples):
        tokens = text.split()
        if len(tokens) > seq_len:
            raise ValueError(f"example {row} has {len(tokens)} tokens, more than seq_len={seq_len}")
        ids[row, : len(tokens)] = torch.tensor([index[t] for t in tokens])
    return ids, torch.tensor([label for _, label in examples], dtype=torch.long)
