"""Subword vocabularies (Hugging Face ``tokenizers``): a converted transformers checkpoint keeps
its tokenizer, and the command line generates and evaluates text with it; generated text streams
token by token exactly as the whole sequence decodes."""

import json

import pytest
import torch

pytest.importorskip("tokenizers")
from tiny_tokenizers import TEXT, byte_level_tokenizer, metaspace_tokenizer  # noqa: E402

from reformer.cli import main  # noqa: E402
from reformer.data import TextStream, TokenizerVocab, load_corpus, vocab_from_dict  # noqa: E402

SAMPLES = ["the quick brown dog sleeps", "naïve café — 東京 under a tree", "a  b\tc the end "]


@pytest.mark.parametrize("make", [metaspace_tokenizer, byte_level_tokenizer], ids=["metaspace", "byte-level"])
@pytest.mark.parametrize("text", SAMPLES)
def test_streamed_text_equals_the_whole_decoded(make, text):
    tok = make()
    vocab = vocab_from_dict({"kind": "tokenizer", "tokenizer": json.loads(tok.to_str())})
    ids = vocab.encode(text).tolist()
    assert ids == tok.encode(text, add_special_tokens=False).ids
    for cut in range(len(ids)):  # every prompt length, including none, that ends on a whole character
        if "\ufffd" in vocab.decode(ids[:cut]):
            continue
        stream = TextStream(vocab, ids[:cut])
        pieces = [stream.step(t) for t in ids[cut:]]
        assert vocab.decode(ids[:cut]) + "".join(pieces) + stream.finish() == vocab.decode(ids), (cut, pieces)
        assert not any("\ufffd" in p for p in pieces)  # a character split over tokens waits for its last byte


def test_the_vocabulary_round_trips_and_refuses_a_bad_description():
    vocab = TokenizerVocab(json.loads(metaspace_tokenizer().to_str()))
    again = vocab_from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again.num_tokens == vocab.num_tokens == 48
    assert again.encode(SAMPLES[0]).tolist() == vocab.encode(SAMPLES[0]).tolist()
    with pytest.raises(ValueError, match="not a tokenizers tokenizer"):
        TokenizerVocab({"model": {"type": "Nonsense"}})


def test_a_text_corpus_is_encoded_with_the_models_tokenizer(tmp_path):
    vocab = TokenizerVocab(json.loads(metaspace_tokenizer().to_str()))
    (tmp_path / "text.txt").write_text(TEXT)
    corpus = load_corpus(str(tmp_path / "text.txt"), vocab=vocab)
    assert corpus.vocab is vocab
    assert torch.cat([corpus.train, corpus.valid]).tolist() == vocab.encode(TEXT).tolist()


def test_a_converted_checkpoint_generates_and_evaluates_with_its_tokenizer(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = metaspace_tokenizer()
    config = transformers.ReformerConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=16, num_attention_heads=2, attention_head_size=8,
        attn_layers=["lsh", "lsh"], feed_forward_size=32, axial_pos_shape=[4, 16], axial_pos_embds_dim=[8, 8],
        max_position_embeddings=64, lsh_attn_chunk_length=8, num_buckets=4,
        num_hashes=2, hash_seed=3, is_decoder=True,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.ReformerModelWithLMHead(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p))  # a model whose greedy choices vary
    hf.save_pretrained(tmp_path / "hf")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>")  # fmt: skip
    fast.save_pretrained(tmp_path / "hf")

    out = tmp_path / "ours"
    assert main(["convert", "--from-transformers", str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert json.loads((out / "vocab.json").read_text())["kind"] == "tokenizer"
    capsys.readouterr()

    prompt = "the dog"
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    hf.generation_config.eos_token_id = None  # always 12 new tokens
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    capsys.readouterr()  # (transformers prints warnings)
    assert len(set(theirs[0, -12:].tolist())) > 3
    assert main(["generate", "--checkpoint", str(out), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0  # fmt: skip
    assert capsys.readouterr().out == tok.decode(theirs[0].tolist(), skip_special_tokens=False) + "\n"

    (tmp_path / "text.txt").write_text(" ".join([TEXT] * 10))
    assert main(["eval", "--checkpoint", str(out), "--data", str(tmp_path / "text.txt"), "--seq-len", "32"]) == 0
    assert "loss" in capsys.readouterr().out

    # and trains on more text from its weights, in its vocabulary
    tuned = tmp_path / "tuned"
    assert main(["train", "--data", str(tmp_path / "text.txt"), "--init-from", str(out), "--seq-len", "32",
                 "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--save-every", "2", "--lr", "1e-4",
                 "--out", str(tuned)]) == 0  # fmt: skip
    assert "initialised from" in capsys.readouterr().err
    assert json.loads((tuned / "checkpoints" / "step-0000002" / "vocab.json").read_text())["kind"] == "tokenizer"

    # --byte-vocab keeps bytes, not the tokenizer
    byte_config = transformers.ReformerConfig(**{**config.to_dict(), "vocab_size": 258})
    hf_bytes = transformers.ReformerModelWithLMHead(byte_config).eval()
    hf_bytes.save_pretrained(tmp_path / "hf-bytes")
    fast.save_pretrained(tmp_path / "hf-bytes")
    bytes_out = tmp_path / "bytes"
    assert main(["convert", "--from-transformers", str(tmp_path / "hf-bytes"), "--out", str(bytes_out),
                 "--byte-vocab"]) == 0  # fmt: skip
    assert json.loads((bytes_out / "vocab.json").read_text()) == {"kind": "byte"}
