"""Labelled documents for sequence classification (``reformer train --task classify``).

Three sources:

- a text file of ``label<TAB>text`` lines, one document per line (the text is everything after
  the first tab; blank lines are skipped);
- a folder holding one sub-folder per label, each file in it (at any depth) one document;
- ``listops`` / ``listops:N``: Long Range Arena's ListOps (:func:`reformer.data.listops_examples`),
  ``N`` training expressions (default 2,000) and ``N // 10`` validation ones, drawn at lengths up
  to ``seq_len`` tokens.

Labels get ids in sorted order of their names (or a model's own order, see
:func:`load_labelled`). A file document goes to the validation split when the SHA-256 of its
text falls in the first :data:`VALID_SHARE` of the hash space: the split does not depend on the
order of lines or files, and a duplicated document is never on both sides. Documents longer than
``seq_len`` tokens are truncated to their first ``seq_len`` tokens; shorter ones are padded on the
right with token 0 and an input mask keeps the padding out of attention and pooling.
"""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import (
    LISTOPS_PAD,
    LISTOPS_VOCAB,
    ByteVocab,
    CharVocab,
    ListOpsSpec,
    Vocab,
    WordVocab,
    listops_examples,
)

#: The share of a file's documents (by hash of their text) that validates.
VALID_SHARE = 0.1
#: ``listops`` without a count: training expressions.
LISTOPS_TRAIN = 2000
#: Token id of padding (ListOps' ``<pad>``; a byte or character that the input mask hides otherwise).
PAD = LISTOPS_PAD


@dataclass
class LabelledSet:
    """Documents as token ids ``ids`` ``(n, seq_len)`` right-padded with :data:`PAD`, their
    lengths ``(n,)`` (<= seq_len) and label ids ``labels`` ``(n,)``."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, input_mask, labels)`` of the documents ``index`` ``(b,)``."""
        ids = self.ids[index]  # (b, seq_len)
        mask = torch.arange(ids.shape[1]) < self.lengths[index, None]  # (b, seq_len), True on real tokens
        return ids, mask, self.labels[index]


@dataclass
class LabelledCorpus:
    """Training and validation documents, their vocabulary and the label names (id order)."""

    name: str
    train: LabelledSet
    valid: LabelledSet
    vocab: Vocab
    labels: tuple[str, ...]


def read_tsv(path: Path) -> list[tuple[str, str]]:
    """``(label, text)`` of each non-blank line of a ``label<TAB>text`` file (a UTF-8 byte-order
    mark at its start, which some editors write, is not part of the first label)."""
    docs = []
    for number, raw in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{number}: not UTF-8 text") from None
        label, tab, text = line.partition("\t")
        if not tab:
            raise ValueError(f"{path}:{number}: expected 'label<TAB>text', found no tab")
        if not label.strip():
            raise ValueError(f"{path}:{number}: empty label before the tab")
        if not text:
            raise ValueError(f"{path}:{number}: empty text after the tab")
        docs.append((label.strip(), text))
    return docs


def read_label_folders(root: Path) -> list[tuple[str, str]]:
    """``(label, text)`` of each file under ``root/<label>/`` (hidden names skipped); every
    label folder must hold a document."""
    docs = []
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or file.is_dir():
            continue
        if len(relative.parts) == 1:
            raise ValueError(f"{file}: a document must be in a sub-folder named after its label")
        if not file.is_file():
            raise ValueError(f"{file}: not a regular file")
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{file}: not UTF-8 text") from None
        if not text:
            raise ValueError(f"{file}: empty document")
        docs.append((relative.parts[0], text))
    found = {label for label, _ in docs}
    for folder in sorted(root.iterdir()):  # a class without documents would silently vanish from the model
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in found:
            raise ValueError(f"{folder}: a label folder without documents")
    return docs


def is_validation(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VALID_SHARE


def label_ids(found: list[str], source: str, known: tuple[str, ...] | None) -> tuple[str, ...]:
    """The label names in id order: ``known`` (a model's), which must cover ``found``, else
    ``found``'s sorted."""
    names = sorted(set(found))
    if known is None:
        if len(names) < 2:
            raise ValueError(f"{source}: found {len(names)} label(s) {names}; classification needs at least 2")
        return tuple(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{source}: labels {unknown[:10]} are not among the model's {list(known)}")
    return known


def pack(encoded: list[torch.Tensor], labels: list[int], seq_len: int) -> LabelledSet:
    """Token id vectors, truncated to ``seq_len`` and padded, as a :class:`LabelledSet`."""
    ids = torch.full((len(encoded), seq_len), PAD, dtype=torch.long)
    lengths = torch.tensor([min(len(e), seq_len) for e in encoded], dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, : lengths[row]] = tokens[:seq_len]
    return LabelledSet(ids, lengths, torch.tensor(labels, dtype=torch.long))


def load_listops(spec: str, seq_len: int) -> LabelledCorpus:
    """``listops`` or ``listops:N``: ``N`` training and ``N // 10`` validation expressions (all
    distinct) of between ``seq_len // 4`` and ``seq_len`` tokens, from fixed seeds."""
    count = spec.partition(":")[2]
    if count and (not count.isdigit() or int(count) < 10):
        raise ValueError(f"--data {spec}: expected listops or listops:N with N >= 10 training examples")
    if seq_len < 16:
        raise ValueError(f"ListOps needs --seq-len >= 16, got {seq_len}")
    n_train = int(count) if count else LISTOPS_TRAIN
    shape = ListOpsSpec(min_length=seq_len // 4, max_length=seq_len + 1)
    examples = listops_examples(n_train + n_train // 10, seed=0, spec=shape)
    vocab = WordVocab(LISTOPS_VOCAB)
    encoded = [vocab.encode(text) for text, _ in examples]
    values = [value for _, value in examples]
    names = tuple(str(v) for v in range(10))
    return LabelledCorpus(spec, pack(encoded[:n_train], values[:n_train], seq_len),
                          pack(encoded[n_train:], values[n_train:], seq_len), vocab, names)  # fmt: skip


def load_labelled(spec: str, vocab: str | Vocab, seq_len: int, labels: tuple[str, ...] | None = None) -> LabelledCorpus:
    """The documents of ``spec`` (a ``label<TAB>text`` file, a folder per label, or ListOps),
    encoded with ``vocab`` (``"byte"``, ``"char"`` built from the documents, or a model's) and
    split (see the module doc). ``labels``: a model's label names, which fix the ids."""
    if spec == "listops" or spec.startswith("listops:"):
        corpus = load_listops(spec, seq_len)
        if labels is not None and labels != corpus.labels:
            raise ValueError(f"--data {spec}: the model's labels {list(labels)} are not ListOps' 0-9")
        return corpus
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data {spec}: no such file or folder (labelled documents are a label<TAB>text "
                                "file, a folder with a sub-folder per label, or listops[:N])")  # fmt: skip
    docs = read_label_folders(path) if path.is_dir() else read_tsv(path)
    if not docs:
        raise ValueError(f"{spec}: no documents")
    names = label_ids([label for label, _ in docs], spec, labels)
    if isinstance(vocab, str):
        vocab = ByteVocab() if vocab == "byte" else CharVocab("".join(text for _, text in docs))
    index = {name: i for i, name in enumerate(names)}
    splits: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    for label, text in docs:
        try:
            encoded = vocab.encode(text)
        except ValueError as exc:
            raise ValueError(f"{spec}: {exc} (the model's vocabulary has {vocab.num_tokens})") from None
        split = splits[is_validation(text)]
        split[0].append(encoded)
        split[1].append(index[label])
    (train, train_labels), (valid, valid_labels) = splits[False], splits[True]
    if not train or not valid:
        raise ValueError(f"{spec}: {len(docs)} documents leave the {'validation' if train else 'training'} split "
                         f"empty ({VALID_SHARE:.0%} of documents validate, by hash); give more documents")  # fmt: skip
    return LabelledCorpus(path.name, pack(train, train_labels, seq_len), pack(valid, valid_labels, seq_len), vocab,
                          names)  # fmt: skip


class ExampleSampler:
    """Batches of documents of a :class:`LabelledSet`: each epoch in a fresh random order (from
    a seeded generator), or for ``evaluation`` in the stored order, wrapping around, where the
    documents repeated to fill a batch get label -100 (ignored, so each is scored once). Its
    state (generator, order, position, passes) travels with checkpoints."""

    def __init__(self, data: LabelledSet, batch_size: int, seed: int = 0, evaluation: bool = False):
        if len(data) == 0:
            raise ValueError("no documents to draw batches from")
        self.data, self.batch_size, self.evaluation = data, batch_size, evaluation
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position, self.passes = self._new_order(), 0, 0

    def _new_order(self) -> torch.Tensor:
        n = len(self.data)
        return torch.arange(n) if self.evaluation else torch.randperm(n, generator=self.generator)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ids`` ``(batch, seq_len)``, ``input_mask`` ``(batch, seq_len)`` and ``labels`` ``(batch,)``."""
        picked, repeated, needed = [], [], self.batch_size
        while needed:
            if self.position == len(self.order):
                self.order, self.position, self.passes = self._new_order(), 0, self.passes + 1
            take = min(needed, len(self.order) - self.position)
            picked.append(self.order[self.position : self.position + take])
            repeated.append(torch.full((take,), self.evaluation and self.passes > 0))
            self.position, needed = self.position + take, needed - take
        ids, mask, labels = self.data.rows(torch.cat(picked))
        return ids, mask, labels.masked_fill(torch.cat(repeated), -100)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position,
                "passes": self.passes}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]
        self.passes = state.get("passes", 0)  # (training samplers saved before passes were counted)
