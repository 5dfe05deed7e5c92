import pytest
import torch

from reformer.data import (
    ByteVocab,
    CharVocab,
    DuplicationTask,
    WindowSampler,
    builtin_text,
    load_corpus,
    load_enwik8,
    vocab_from_dict,
)


def test_builtin_corpus_needs_no_download():
    text = builtin_text()
    assert len(text) > 300_000 and "the" in text
    corpus = load_corpus("builtin")
    assert corpus.vocab.num_tokens == 256
    assert len(corpus.train) > 19 * len(corpus.valid) - 100
    assert corpus.train.dtype == torch.long and int(corpus.train.max()) < 256
    assert ByteVocab().decode(corpus.train[:200]) == text.encode()[:200].decode("utf-8", errors="replace")


def test_vocabularies_round_trip():
    byte = ByteVocab()
    assert byte.decode(byte.encode("héllo ✓")) == "héllo ✓"
    char = CharVocab("hello world")
    assert char.num_tokens == len(set("hello world"))
    assert char.decode(char.encode("hello")) == "hello"
    assert vocab_from_dict(char.to_dict()).chars == char.chars
    with pytest.raises(ValueError, match="not in the vocabulary"):
        char.encode("xyz")
    corpus = load_corpus("builtin", vocab="char")
    assert corpus.vocab.num_tokens < 256 and int(corpus.train.max()) < corpus.vocab.num_tokens


def test_user_files_and_their_errors(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 40)
    corpus = load_corpus(str(path), valid_fraction=0.1)
    assert len(corpus.train) + len(corpus.valid) == 256 * 40 and corpus.name == "data.bin"
    torch.testing.assert_close(corpus.valid[:4].long(), torch.tensor([0, 1, 2, 3]))  # a file is mapped as uint8
    with pytest.raises(FileNotFoundError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="vocab"):
        load_corpus("builtin", vocab="words")


def test_enwik8_split(tmp_path):
    path = tmp_path / "enwik8"
    path.write_bytes(bytes(range(100)) * 3)  # 300 bytes, split as 200 / 50 / 50
    train, valid, test = load_enwik8(str(path), split=(200, 50, 50))
    assert (len(train), len(valid), len(test)) == (200, 50, 50)
    assert int(valid[0]) == 0 and int(test[0]) == 50
    with pytest.raises(ValueError, match="enwik8 has"):
        load_enwik8(str(path))  # far shorter than the real 100M bytes


def test_windows_are_contiguous_deterministic_and_resumable():
    data = torch.arange(1000)
    sampler = WindowSampler(data, seq_len=64, batch_size=4, seed=3)
    batch = sampler.next_batch()
    assert batch.shape == (4, 65)
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 64, dtype=torch.long))
    state = sampler.state_dict()
    following = [sampler.next_batch() for _ in range(3)]
    again = WindowSampler(data, seq_len=64, batch_size=4, seed=3)
    assert torch.equal(again.next_batch(), batch)
    again.load_state_dict(state)
    assert all(torch.equal(again.next_batch(), f) for f in following)
    with pytest.raises(ValueError, match="too few"):
        WindowSampler(torch.arange(64), seq_len=64, batch_size=1)


def test_duplication_task_makes_0w0w_and_scores_the_second_copy():
    task = DuplicationTask(seq_len=32, batch_size=5, n_symbols=9, seed=1)
    tokens, scored = task.next_batch()
    assert tokens.shape == scored.shape == (5, 32)
    assert torch.equal(tokens[:, 0], torch.zeros(5, dtype=torch.long))
    assert torch.equal(tokens[:, 16], torch.zeros(5, dtype=torch.long))
    assert torch.equal(tokens[:, 1:16], tokens[:, 17:])
    assert tokens[:, 1:16].min() >= 1 and tokens.max() <= 9
    assert scored[:, 17:].all() and not scored[:, :17].any()
    state = task.state_dict()
    nxt = task.next_batch()[0]
    task.load_state_dict(state)
    assert torch.equal(task.next_batch()[0], nxt)
    with pytest.raises(ValueError, match="even seq_len"):
        DuplicationTask(seq_len=7, batch_size=1)
