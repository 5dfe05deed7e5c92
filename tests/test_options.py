"""LSHOptions: built once from the config, passed whole down to the attention layers."""

import dataclasses

import pytest
import torch

from reformer import LSHAttention, LSHSelfAttention, ReformerConfig, ReformerLM
from reformer.attention.options import LSHOptions


def test_from_config_reads_every_option_the_config_has():
    cfg = ReformerConfig(
        bucket_size=8, n_hashes=3, causal=True, strict_causal=False, lsh_dropout=0.1, n_buckets=6,
        allow_duplicate_attention=False, attend_across_buckets=False, random_rotations_per_head=True,
        hash_seed=5, pad_bucket=True, n_buckets_first_major=False, self_attn_value=-1e4,
        exp_lse_softmax=True, attn_backend="chunked", max_seq_len=64,
    )  # fmt: skip
    options = LSHOptions.from_config(cfg)
    for field in dataclasses.fields(LSHOptions):
        if field.name not in (*LSHOptions.LAYER_ONLY, "max_seq_len"):
            assert getattr(options, field.name) == getattr(cfg, field.name), field.name
    assert options.max_seq_len == cfg.bucket_length()


def test_model_layers_share_the_one_options_object():
    model = ReformerLM(num_tokens=16, dim=16, depth=2, heads=2, max_seq_len=32, bucket_size=4, n_hashes=2)
    layers = [m for m in model.modules() if isinstance(m, LSHAttention)]
    assert len(layers) == 2 and layers[0].options is layers[1].options
    assert layers[0].options == LSHOptions.from_config(model.config)


def test_keywords_build_the_same_options_as_the_object():
    by_keywords = LSHSelfAttention(dim=16, heads=2, bucket_size=4, n_hashes=2, causal=True, dropout=0.1, exp_lse=True)
    options = LSHOptions(bucket_size=4, n_hashes=2, causal=True, lsh_dropout=0.1, exp_lse_softmax=True)
    by_object = LSHSelfAttention(dim=16, heads=2, options=options)
    assert by_keywords.lsh_attn.options == by_object.lsh_attn.options == options
    assert by_object.causal and by_object.attn_dropout == 0.1


def test_keywords_and_object_together_are_refused():
    with pytest.raises(TypeError, match=r"not both.*n_hashes"):
        LSHAttention(n_hashes=2, options=LSHOptions())
    with pytest.raises(TypeError, match="options must be an LSHOptions"):
        LSHAttention(options={"n_hashes": 2})


def test_assigning_an_option_replaces_the_object_and_is_checked():
    layer = LSHAttention(bucket_size=4, n_hashes=2, n_buckets=4)
    before = layer.options
    layer.n_hashes = 3
    assert layer.options.n_hashes == 3 and before.n_hashes == 2
    with pytest.raises(ValueError, match="n_hashes"):
        layer.n_hashes = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.options.n_hashes = 4
    out, _, buckets = layer(torch.randn(1, 16, 8), torch.randn(1, 16, 8))
    assert buckets.shape == (1, 3, 16)
