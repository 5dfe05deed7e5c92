from dataclasses import fields

import pytest

from reformer import ReformerConfig


def test_every_field_has_a_doc():
    docs = ReformerConfig.field_docs()
    assert set(docs) == {f.name for f in fields(ReformerConfig)}
    assert all(len(doc) > 10 for doc in docs.values())


def test_json_round_trip(tmp_path):
    cfg = ReformerConfig(
        num_tokens=300, dim=64, heads=4, n_buckets=(4, 8), axial_position_shape=[8, 16], max_seq_len=128
    )
    cfg.save(tmp_path / "config.json")
    loaded = ReformerConfig.load(tmp_path / "config.json")
    assert loaded == cfg
    assert loaded.n_buckets == (4, 8) and loaded.axial_position_shape == (8, 16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=0), "dim"),
        (dict(depth=-1), "depth"),
        (dict(heads=3), "divisible"),
        (dict(bucket_size=True), "bucket_size"),
        (dict(n_buckets=5), "n_buckets"),
        (dict(lsh_dropout=1.5), "lsh_dropout"),
        (dict(num_mem_kv=-1), "num_mem_kv"),
        (dict(n_local_attn_heads=9), "n_local_attn_heads"),
        (dict(ff_activation="tanh"), "ff_activation"),
    ],
)
def test_invalid_values_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReformerConfig(**kwargs)


def test_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown config fields"):
        ReformerConfig.from_dict({"dim": 64, "dimm": 3})
