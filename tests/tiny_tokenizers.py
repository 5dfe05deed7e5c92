"""Small Hugging Face ``tokenizers`` tokenizers trained offline, in the two styles subword models
use: SentencePiece-like (``Metaspace``: a word's leading space is part of its first piece, as in
``google/reformer-crime-and-punishment``) and GPT-2-like byte-level BPE (a character can span
tokens)."""

from __future__ import annotations

TEXT = " ".join(
    "the quick brown fox jumps over the lazy dog while the naive cafe owner counts coins "
    "near the river bank and the dog sleeps in the warm sun under a tall tree".split()
    * 4
)


def metaspace_tokenizer(vocab_size: int = 48):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    specials = ["<pad>", "</s>", "<unk>"]
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    return tok


def byte_level_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet))
    return tok
