"""Task heads: sequence classification (pooling, padding, loss, Hugging Face parity) and masked
language modelling (BERT corruption, loss, Hugging Face parity), saved and loaded."""

import pytest
import torch
import torch.nn.functional as F

from reformer import ReformerConfig, ReformerForMaskedLM, ReformerForSequenceClassification, ReformerLM
from reformer.heads import mask_tokens, pool

SIZE = dict(num_tokens=20, dim=32, depth=2, heads=2, bucket_size=8, max_seq_len=64)


def test_pool_against_explicit_loops():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    for row in range(3):
        real = hidden[row][mask[row]]  # (k, 4)
        assert torch.equal(pool(hidden, mask, "first")[row], hidden[row, 0])
        assert torch.equal(pool(hidden, mask, "last")[row], real[-1])
        assert torch.allclose(pool(hidden, mask, "mean")[row], real.mean(0))
        assert torch.equal(pool(hidden, mask, "max")[row], real.amax(0))
    assert torch.allclose(pool(hidden, None, "mean"), hidden.mean(1))


@pytest.mark.parametrize("pooling", ["first", "last", "mean", "max"])
def test_padding_does_not_change_the_class_logits(pooling):
    # dense attention masks padded keys exactly: a right-padded sequence classifies as itself
    model = ReformerForSequenceClassification(**SIZE, use_full_attn=True, num_labels=3, pooling=pooling).eval()
    tokens = torch.randint(0, 20, (1, 40), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([tokens, torch.randint(0, 20, (1, 24))], dim=1)
    mask = torch.arange(64)[None] < 40
    with torch.no_grad():
        alone, in_batch = model(tokens), model(padded, input_mask=mask)
        other_padding = model(torch.cat([tokens, torch.zeros(1, 24, dtype=torch.long)], dim=1), input_mask=mask)
    assert torch.allclose(alone, in_batch, atol=1e-5) and torch.allclose(in_batch, other_padding, atol=1e-5)


def test_with_lsh_and_a_pad_bucket_the_amount_of_padding_does_not_change_the_class_logits():
    # padding hashed into a bucket of its own sorts after every real token: 8 or 24 padded
    # positions leave the real tokens' chunks as they were (reformer train pads every document so)
    model = ReformerForSequenceClassification(**SIZE, n_hashes=2, pad_bucket=True, hash_seed=1, num_labels=3).eval()
    tokens = torch.randint(0, 20, (1, 40), generator=torch.Generator().manual_seed(1))
    logits = []
    for length in (48, 64):
        padded = torch.cat([tokens, torch.randint(0, 20, (1, length - 40))], dim=1)
        with torch.no_grad():
            logits.append(model(padded, input_mask=torch.arange(length)[None] < 40))
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_classification_loss_and_label_checks():
    model = ReformerForSequenceClassification(**SIZE, num_labels=4).eval()
    tokens, labels = torch.randint(0, 20, (3, 32)), torch.tensor([0, 3, 1])
    with torch.no_grad():
        torch.manual_seed(0)
        logits = model(tokens)
        torch.manual_seed(0)
        loss = model(tokens, labels=labels)
    assert logits.shape == (3, 4) and torch.allclose(loss, F.cross_entropy(logits, labels))
    for bad in (torch.tensor([0, 1]), torch.tensor([0.0, 1.0, 2.0]), [0, 1, 2]):
        with pytest.raises(ValueError, match=r"labels must be integer class ids of shape \(3,\)"):
            model(tokens, labels=bad)


@pytest.mark.parametrize(
    "field,value,match",
    [("num_labels", 1, "num_labels"), ("pooling", "cls", "pooling must be one of"), ("classifier_dropout", 1.5, "")],
)
def test_head_config_is_checked(field, value, match):
    with pytest.raises(ValueError, match=match or field):
        ReformerConfig(**SIZE, **{field: value})


def test_mask_tokens_follows_bert():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 19, (64, 512), generator=g)  # never the mask id 19
    real = torch.rand(64, 512, generator=g) < 0.9
    inputs, labels = mask_tokens(tokens, mask_token=19, num_tokens=20, p=0.15, generator=g, input_mask=real)
    chosen = labels != -100
    assert torch.equal(labels[chosen], tokens[chosen]) and not chosen[~real].any()
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    assert abs(chosen.sum().item() / real.sum().item() - 0.15) < 0.01
    masked = (inputs[chosen] == 19).float().mean().item()
    kept = (inputs[chosen] == tokens[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 / 20)) < 0.02  # a random token may be the same
    with pytest.raises(ValueError, match="mask_token"):
        mask_tokens(tokens, mask_token=20, num_tokens=20)


def test_masked_lm_loss_is_over_the_masked_positions_only():
    model = ReformerForMaskedLM(**SIZE).eval()
    inputs, labels = mask_tokens(torch.randint(0, 19, (2, 64)), 19, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.manual_seed(0)
        logits = model(inputs)
        torch.manual_seed(0)
        loss = model(inputs, labels=labels)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1), ignore_index=-100))
    with pytest.raises(ValueError, match="causal=False"):
        ReformerForMaskedLM(**SIZE, causal=True)
    with pytest.raises(TypeError, match="does not generate"):
        model.generate(inputs[:, :4], 3)


@pytest.mark.parametrize("cls", [ReformerForSequenceClassification, ReformerForMaskedLM])
def test_heads_save_and_load(tmp_path, cls):
    model = cls(**SIZE, hash_seed=1).eval()
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 19, (2, 64))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    if cls is ReformerForMaskedLM:  # a subclass of ReformerLM: loads as what it is
        assert type(ReformerLM.from_pretrained(tmp_path)) is ReformerForMaskedLM
    else:
        with pytest.raises(ValueError, match=f"holds a {cls.__name__}, not a ReformerLM"):
            ReformerLM.from_pretrained(tmp_path)


# --- Hugging Face parity ------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

HF = dict(vocab_size=20, hidden_size=16, num_attention_heads=2, attention_head_size=8, attn_layers=["local", "lsh"],
          feed_forward_size=32, axial_pos_shape=[4, 16], axial_pos_embds_dim=[8, 8], max_position_embeddings=64,
          lsh_attn_chunk_length=4, local_attn_chunk_length=8, num_buckets=4, num_hashes=2, hash_seed=3,
          is_decoder=False, hidden_act="relu")  # fmt: skip


def perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # every weight differs, so a mis-mapped one shows
    return model.eval()


@pytest.mark.parametrize("kind", ["classify", "mlm"])
def test_logits_equal_transformers_and_round_trip(kind, tmp_path):
    from reformer.convert import from_transformers, to_transformers

    config = transformers.ReformerConfig(**HF, num_labels=7)
    hf_cls = transformers.ReformerForSequenceClassification if kind == "classify" else transformers.ReformerForMaskedLM
    hf = perturbed(hf_cls(config))
    ours = from_transformers(hf)
    assert type(ours) is (ReformerForSequenceClassification if kind == "classify" else ReformerForMaskedLM)
    ids = torch.randint(0, 20, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs, mine = hf(input_ids=ids).logits, ours(ids)
        assert mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-5)
        back = to_transformers(ours)
        assert type(back) is hf_cls and torch.allclose(back(input_ids=ids).logits, theirs, atol=1e-5)
    hf.save_pretrained(tmp_path)  # a directory saved by transformers converts to the same model
    with torch.no_grad():
        assert torch.allclose(from_transformers(tmp_path)(ids), theirs, atol=1e-5)
    if kind == "classify":
        ours.config.pooling = "mean"
        with pytest.raises(ValueError, match="pooling"):
            to_transformers(ours)


def test_label_names_travel_both_ways_with_a_byte_vocabulary(tmp_path, capsys):
    """A byte-level Hugging Face classifier converts with its ``id2label`` as our vocab.json's
    labels (so ``reformer eval`` can name them), and our label names become ``id2label``."""
    from reformer.cli import main
    from reformer.cli.loading import read_labels
    from reformer.convert import from_transformers, to_transformers

    names = {0: "neg", 1: "neutral", 2: "pos"}
    config = transformers.ReformerConfig(**{**HF, "vocab_size": 258}, num_labels=3, id2label=names)
    hf = perturbed(transformers.ReformerForSequenceClassification(config))
    ours = from_transformers(hf, byte_vocab=True)
    assert ours.vocab == {"kind": "byte", "labels": ["neg", "neutral", "pos"]}
    assert to_transformers(ours).config.id2label == names
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ours"
    assert main(["convert", "--from-transformers", str(tmp_path / "hf"), "--out", str(out), "--byte-vocab"]) == 0
    assert read_labels(out, ours.config) == ("neg", "neutral", "pos")
