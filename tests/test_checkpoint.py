import json
import sys

import pytest
import torch

from reformer import Reformer, ReformerLM


def _model(**kw):
    return ReformerLM(num_tokens=40, dim=32, depth=2, heads=2, bucket_size=8, n_hashes=2, max_seq_len=64, **kw).eval()


@pytest.mark.parametrize(
    "kw", [dict(), dict(weight_tie=True, causal=True, num_mem_kv=2), dict(weight_tie_embedding=True)]
)
def test_round_trip_gives_identical_logits(tmp_path, kw):
    model = _model(**kw)
    tokens = torch.randint(0, 40, (2, 64))
    model.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "config.json", "manifest.json", "model.safetensors"]
    loaded = ReformerLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))


def test_clear_errors_for_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ReformerLM.from_pretrained(tmp_path)
    _model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a ReformerLM"):
        Reformer.from_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    config["dim"] = 64  # weights no longer fit the config
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        ReformerLM.from_pretrained(tmp_path)

    _model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:100])
    with pytest.raises(ValueError, match="model.safetensors has 100 bytes.*truncated"):
        ReformerLM.from_pretrained(tmp_path)
    flipped = bytearray(intact)
    flipped[len(flipped) // 2] ^= 0x10  # one bit inside a weight: still a valid safetensors file
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="model.safetensors does not match its checksum"):
        ReformerLM.from_pretrained(tmp_path)
    (tmp_path / "manifest.json").unlink()  # no manifest (an older checkpoint): the format check remains
    weights.write_bytes(intact[:100])
    with pytest.raises(ValueError, match="corrupt weights"):
        ReformerLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        ReformerLM.from_pretrained(tmp_path)


def test_a_missing_directory_named_like_a_repo_id_is_one_clear_error_without_the_hub_extra(
    tmp_path, monkeypatch, capsys
):
    """``runs/name`` with a typo looks like a Hub repo id: without huggingface_hub it is a
    FileNotFoundError (one line from the CLI) that says no such directory exists."""
    from reformer.cli import main

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when it is not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no directory runs/typo; as a Hugging Face Hub repo id it needs"):
        ReformerLM.from_pretrained("runs/typo")
    assert main(["eval", "--checkpoint", "runs/typo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reformer eval: error: no directory runs/typo;") and err.count("\n") == 1
