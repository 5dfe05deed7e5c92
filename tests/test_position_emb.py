"""One config field, ``position_emb``, chooses how a model knows positions; the peer's boolean
keywords map to it, two that disagree are refused, and configs saved before it load as before."""

from __future__ import annotations

import json
import re

import pytest
import torch

from reformer import LSHSelfAttention, ReformerConfig, ReformerLM
from reformer.config import POSITION_EMBS, POSITION_FLAGS
from reformer.positions import AbsolutePositionalEmbedding, AxialPositionalEmbedding, FixedPositionalEmbedding

SMALL = dict(num_tokens=20, dim=16, depth=1, heads=2, bucket_size=4, max_seq_len=32)
EMBEDDINGS = {"axial": AxialPositionalEmbedding, "absolute": AbsolutePositionalEmbedding,
              "fixed": FixedPositionalEmbedding, "rotary": type(None), "none": type(None)}  # fmt: skip


def _rotary_layers(model: ReformerLM) -> set[bool]:
    return {m.rotary_emb for m in model.modules() if isinstance(m, LSHSelfAttention)}


@pytest.mark.parametrize("kind", POSITION_EMBS)
def test_position_emb_chooses_the_embedding_and_rotary_layers(kind):
    model = ReformerLM(**SMALL, position_emb=kind)
    assert type(model.pos_emb) is EMBEDDINGS[kind]
    assert _rotary_layers(model) == {kind == "rotary"}
    assert model(torch.randint(0, 20, (1, 9))).shape == (1, 9, 20)


def test_the_default_is_axial():
    assert ReformerConfig().position_emb == "axial"


@pytest.mark.parametrize("flag", POSITION_FLAGS)
def test_each_boolean_keyword_is_an_alias(flag):
    config = ReformerConfig(**{flag: True})
    assert config.position_emb == POSITION_FLAGS[flag]
    assert ReformerConfig(**{flag: True, "position_emb": POSITION_FLAGS[flag]}) == config
    # read back as the flag of position_emb (code written against the boolean fields)
    assert {name: getattr(config, name) for name in POSITION_FLAGS} == {name: name == flag for name in POSITION_FLAGS}


def test_flags_that_say_false():
    assert ReformerConfig(axial_position_emb=False).position_emb == "none"  # as before: no positions
    assert ReformerConfig(absolute_position_emb=True, axial_position_emb=False).position_emb == "absolute"
    assert ReformerConfig(rotary_emb=False, fixed_position_emb=False).position_emb == "axial"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(axial_position_emb=True, absolute_position_emb=True), "axial_position_emb=True and absolute_pos"),
        (dict(fixed_position_emb=True, rotary_emb=True), "fixed_position_emb=True and rotary_emb=True"),
        (dict(position_emb="axial", rotary_emb=True), "position_emb='axial' and rotary_emb=True disagree"),
        (dict(position_emb="absolute", absolute_position_emb=False), "'absolute' and absolute_position_emb=False"),
        (dict(position_emb="learned"), "position_emb must be one of 'axial', 'absolute', 'fixed', 'rotary', 'none'"),
        (dict(rotary_emb="true"), "rotary_emb must be True or False, got 'true'"),
    ],
)  # fmt: skip
def test_disagreements_are_refused_naming_both(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ReformerConfig(**SMALL, **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        ReformerLM(**SMALL, **options)


def test_a_saved_config_has_the_field_not_the_keywords():
    saved = ReformerConfig(rotary_emb=True).to_dict()
    assert saved["position_emb"] == "rotary" and not set(saved) & set(POSITION_FLAGS)
    assert ReformerConfig.from_dict(saved).position_emb == "rotary"


def _old_style(config: ReformerConfig, **flags) -> dict:
    """``config`` as a version before position_emb saved it: every boolean, axial true by default."""
    data = config.to_dict()
    del data["position_emb"]
    return data | {"axial_position_emb": True, "absolute_position_emb": False, "fixed_position_emb": False,
                   "rotary_emb": False} | flags  # fmt: skip


@pytest.mark.parametrize(
    "flags, kind",
    [
        ({}, "axial"),
        ({"absolute_position_emb": True}, "absolute"),  # absolute over the default axial (reproduce lm, convert)
        ({"fixed_position_emb": True}, "fixed"),
        ({"rotary_emb": True}, "rotary"),  # rotary turned axial off
        ({"axial_position_emb": False}, "none"),
        ({"axial_position_emb": False, "rotary_emb": True}, "rotary"),
    ],
)
def test_configs_saved_before_the_field_load_with_their_old_meaning(flags, kind):
    assert ReformerConfig.from_dict(_old_style(ReformerConfig(**SMALL), **flags)).position_emb == kind


def test_a_checkpoint_saved_before_the_field_loads_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    model = ReformerLM(**SMALL, position_emb="absolute").eval()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta = {k: v for k, v in meta.items() if k in ("architecture", "format_version")} | _old_style(
        model.config, absolute_position_emb=True
    )
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = ReformerLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    tokens = torch.randint(0, 20, (2, 11))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_a_saved_config_that_applied_rotary_with_another_encoding_is_refused():
    with pytest.raises(ValueError, match="absolute_position_emb=True with rotary_emb=True"):
        ReformerConfig.from_dict(_old_style(ReformerConfig(), absolute_position_emb=True, rotary_emb=True))
