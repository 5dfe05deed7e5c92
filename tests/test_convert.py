"""Hugging Face ``transformers`` Reformer <-> ReformerLM: randomly initialised models built
offline, compared logit for logit, round-tripped, and decoded greedily side by side."""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from reformer import ReformerLM  # noqa: E402
from reformer.cli import main  # noqa: E402
from reformer.convert import TRANSFORMERS_LAYOUT, from_transformers, to_transformers  # noqa: E402
from reformer.generate import generate  # noqa: E402

LAYOUTS = [("local", "lsh"), ("lsh",) * 3, ("local",) * 2]
HASHING = [(4, 1), (4, 4), ([2, 4], 1), ([2, 4], 4)]  # (num_buckets, num_hashes)


def hf_model(causal: bool, layers=("local", "lsh"), num_buckets=4, num_hashes=2, vocab=20, **overrides):
    """A tiny random transformers Reformer in eval mode. LSH and local chunks differ (4 vs 8),
    so inputs are padded to their lcm; every parameter (LayerNorms too) is perturbed so that a
    mis-mapped weight shows."""
    options = dict(
        vocab_size=vocab, hidden_size=16, num_attention_heads=2, attention_head_size=8, attn_layers=list(layers),
        feed_forward_size=32, axial_pos_shape=[4, 16], axial_pos_embds_dim=[8, 8], max_position_embeddings=64,
        lsh_attn_chunk_length=4, local_attn_chunk_length=8, num_buckets=num_buckets, num_hashes=num_hashes,
        hash_seed=3, is_decoder=causal, hidden_act="relu",
    )  # fmt: skip
    config = transformers.ReformerConfig(**{**options, **overrides})
    torch.manual_seed(0)
    model = (transformers.ReformerModelWithLMHead if causal else transformers.ReformerForMaskedLM)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def padded_batch(length: int, vocab: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(3, length)`` and their mask: one full row, one right-padded, one left-padded."""
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(1, vocab, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.bool)
    mask[1, length * 2 // 3 :] = False
    mask[2, : length // 4] = False
    return ids, mask


@torch.no_grad()
def max_logit_diff(hf, ours, length: int) -> float:
    ids, mask = padded_batch(length, hf.config.vocab_size)
    theirs = hf(input_ids=ids, attention_mask=mask.long()).logits
    mine = ours(ids, input_mask=mask)
    return (theirs - mine)[mask].abs().max().item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "masked"])
@pytest.mark.parametrize("layers", LAYOUTS, ids=["+".join(x) for x in LAYOUTS])
@pytest.mark.parametrize("num_buckets,num_hashes", HASHING, ids=[f"{b}x{h}" for b, h in HASHING])
def test_logits_equal_theirs(causal, layers, num_buckets, num_hashes):
    hf = hf_model(causal, layers, num_buckets, num_hashes)
    ours = from_transformers(hf)
    assert not ours.training
    # 27: padded to the chunk lcm; 3: shorter than every chunk (dense attention everywhere)
    for length in (27, 3):
        assert max_logit_diff(hf, ours, length) <= 1e-4


def test_learned_positions_and_gelu():
    hf = hf_model(True, axial_pos_embds=False, hidden_act="gelu", layer_norm_eps=1e-5)
    assert max_logit_diff(hf, from_transformers(hf), 27) <= 1e-4


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "masked"])
def test_round_trip_is_lossless(causal):
    hf = hf_model(causal, num_buckets=[2, 4], num_hashes=4)
    ours = from_transformers(hf)
    back = to_transformers(ours)
    assert type(back) is type(hf)
    before, after = hf.state_dict(), back.state_dict()
    before.pop("lm_head.bias")  # unused by transformers' forward (it uses lm_head.decoder.bias)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    fields = ("attn_layers", "num_buckets", "num_hashes", "hash_seed", "is_decoder", "axial_pos_shape",
              "lsh_attn_chunk_length", "local_attn_chunk_length", "feed_forward_size", "layer_norm_eps")  # fmt: skip
    for field in fields:
        assert getattr(back.config, field) == getattr(hf.config, field), field
    ids, mask = padded_batch(27)
    with torch.no_grad():
        assert torch.equal(hf(ids, attention_mask=mask.long()).logits, back(ids, attention_mask=mask.long()).logits)

    again = from_transformers(back)
    assert again.config == ours.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("layers", LAYOUTS, ids=["+".join(x) for x in LAYOUTS])
def test_greedy_generation_matches(layers):
    hf = hf_model(True, layers, num_buckets=[2, 4], num_hashes=4)
    ours = from_transformers(hf)
    prompt = torch.randint(1, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    hf.generation_config.eos_token_id = None  # always 32 new tokens
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 32, temperature=0, use_cache=False), theirs[:, 5:])


def test_byte_vocab_drops_the_two_special_ids(tmp_path, capsys):
    hf = hf_model(True, vocab=258)
    ours = from_transformers(hf, byte_vocab=True)
    assert ours.config.num_tokens == 256
    data = torch.randint(0, 256, (1, 27), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(input_ids=data + 2).logits[..., 2:]
        assert (theirs - ours(data)).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="vocab_size"):
        from_transformers(hf_model(True), byte_vocab=True)

    # the converted model works with our byte vocabulary on the command line
    hf.save_pretrained(tmp_path / "hf")
    out = str(tmp_path / "ours")
    assert main(["convert", "--from-transformers", str(tmp_path / "hf"), "--out", out, "--byte-vocab"]) == 0
    assert main(["generate", "--checkpoint", out, "--prompt", "ab", "--temperature", "0", "--max-new-tokens", "4",
                 "--no-cache"]) == 0  # fmt: skip
    assert capsys.readouterr().out.splitlines()[-1].startswith("ab")


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(hidden_act="gelu_new"), "hidden_act"),
        (dict(feed_forward_size=40), "feed_forward_size"),
        (dict(lsh_num_chunks_before=2), "lsh_num_chunks_before"),
    ],
)
def test_unrepresentable_configs_name_the_field(overrides, field):
    config = hf_model(True).config
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=field):
        from_transformers(transformers.ReformerModelWithLMHead(config))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "masked"])
@pytest.mark.parametrize("chunk,expected", [(8, 16), (4, (4, 8))], ids=["int", "factorised"])
def test_unset_num_buckets_takes_the_value_transformers_chooses(causal, chunk, expected):
    """transformers fills in num_buckets at its first forward from that input's length; the
    conversion takes the value for max_position_embeddings (64) tokens, says so, and then equals
    a transformers model whose first input had that length."""
    hf = hf_model(causal, ("lsh", "local", "lsh"), num_buckets=None, lsh_attn_chunk_length=chunk)
    with pytest.warns(UserWarning, match=rf"num_buckets is not set.*n_buckets={re.escape(str(expected))}.*=64 tokens"):
        ours = from_transformers(hf)
    assert ours.config.n_buckets == expected
    assert max_logit_diff(hf, ours, 64) <= 1e-4  # transformers' first forward: 64 tokens
    chosen = hf.config.num_buckets
    assert (tuple(chosen) if isinstance(chosen, list) else chosen) == expected


def test_unset_num_buckets_with_too_few_positions_is_refused():
    config = hf_model(True).config
    config.num_buckets, config.max_position_embeddings, config.axial_pos_shape = None, 4, [2, 2]
    with pytest.raises(ValueError, match="num_buckets"):
        from_transformers(transformers.ReformerModelWithLMHead(config))


def test_export_of_a_model_built_with_their_layout():
    torch.manual_seed(0)
    ours = ReformerLM(
        **TRANSFORMERS_LAYOUT, num_tokens=20, dim=16, heads=2, depth=2, attn_layers=("local", "lsh"), causal=True,
        max_seq_len=64, bucket_size=4, n_buckets=(2, 4), n_hashes=2, local_chunk_size=8, hash_seed=5,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert max_logit_diff(to_transformers(ours), ours, 27) <= 1e-4


def test_export_names_the_field_we_cannot_express():
    with pytest.raises(ValueError, match="strict_causal"):
        to_transformers(ReformerLM(num_tokens=20, dim=16, depth=1, heads=2, causal=True, max_seq_len=64))


def test_from_directory_and_cli(tmp_path, capsys):
    hf = hf_model(False)
    hf.save_pretrained(tmp_path / "hf")
    assert max_logit_diff(hf, from_transformers(tmp_path / "hf"), 27) <= 1e-4

    out = tmp_path / "ours"
    assert main(["convert", "--from-transformers", str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert "ReformerForMaskedLM (bidirectional" in capsys.readouterr().out
    assert max_logit_diff(hf, ReformerLM.from_pretrained(out).eval(), 27) <= 1e-4

    for argv, match in [
        (["--from-transformers", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "no config.json"),
        (["--from-transformers", str(tmp_path / "hf"), "--out", str(out)], "already holds"),
    ]:
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
