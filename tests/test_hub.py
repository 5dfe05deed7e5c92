"""The Hugging Face Hub: a checkpoint downloaded by huggingface_hub itself (from a Hub on
localhost, tests/fake_hub.py) into a temporary HF_HOME, then loaded offline from that cache,
checked by its manifest; push_to_hub's upload; the model card; ReformerEncDec checkpoints."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from reformer import ReformerEncDec, ReformerLM, hub
from reformer.checkpoint import MANIFEST_NAME, write_manifest
from reformer.cli import main

pytest.importorskip("huggingface_hub")
from fake_hub import FakeHub, commit_of  # noqa: E402

TINY = dict(num_tokens=256, dim=32, depth=1, heads=2, bucket_size=8, max_seq_len=64)

#: Loads "org/tiny" (or the repo in argv[1], at revision argv[2]) and prints the sum of its
#: weights, or the error's type and message: run in a subprocess, since huggingface_hub reads
#: HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE when imported.
LOAD = """
import sys
from reformer import ReformerLM
try:
    m = ReformerLM.from_pretrained(sys.argv[1], revision=sys.argv[2] if len(sys.argv) > 2 else None)
    print(repr(sum(p.double().sum().item() for p in m.parameters())))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def weight_sum(model) -> str:
    return repr(sum(p.double().sum().item() for p in model.parameters()))


@pytest.fixture
def saved(tmp_path):
    model = ReformerLM(**TINY)
    model.vocab = {"kind": "byte"}  # as `reformer train` saves it: uploaded and downloaded with the weights
    model.save_pretrained(tmp_path / "ckpt", training={"data": "builtin", "steps": 10})
    return model, tmp_path / "ckpt"


def hub_env(home: Path, endpoint: str | None) -> dict[str, str]:
    """The environment of a process using the Hub cache in ``home``: offline, or online at ``endpoint``."""
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_CACHE", None)
    if endpoint is None:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"], env["HF_HUB_OFFLINE"] = endpoint, "0"
    return env


def load(home: Path, repo: str, *, endpoint: str | None = None, revision: str | None = None) -> str:
    args = [sys.executable, "-c", LOAD, repo, *([revision] if revision else [])]
    out = subprocess.run(args, env=hub_env(home, endpoint), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def cli(home: Path, *args: str, endpoint: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "reformer.cli", *args]
    return subprocess.run(command, env=hub_env(home, endpoint), capture_output=True, text=True, timeout=300)


def test_hub_download_then_offline_cache_then_tampering(saved, tmp_path):
    model, ckpt = saved
    files = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    fake = FakeHub({"org/tiny": files})
    home = tmp_path / "hf_home"
    try:
        assert load(home, "org/tiny", endpoint=fake.endpoint) == weight_sum(model)
        assert load(home, "org/missing", endpoint=fake.endpoint).startswith(
            "FileNotFoundError no Hugging Face Hub repository org/missing"
        )
    finally:
        fake.close()
    downloaded = {req[1].rsplit("/", 1)[-1] for req in fake.requests if "/resolve/" in req[1]}
    assert downloaded == set(hub.CHECKPOINT_FILES)
    # the Hub server is gone: the cache huggingface_hub laid out serves, by branch and by commit
    assert load(home, "org/tiny") == weight_sum(model)
    assert load(home, "org/tiny", revision=commit_of(files)) == weight_sum(model)
    assert load(home, "org/other").startswith("FileNotFoundError org/other is not in the Hugging Face cache")
    # the manifest checks what the cache holds
    snapshot = next((home / "hub").glob("models--org--tiny/snapshots/*"))
    weights = (snapshot / "model.safetensors").resolve()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert "does not match its checksum" in load(home, "org/tiny")


def test_a_training_checkpoint_uploaded_as_it_is_loads_without_its_trainer_state(saved, tmp_path):
    """A run's ``checkpoints/step-N`` pushed with the Hub's own tools lists ``trainer.pt`` in its
    manifest; the download leaves that file out, and the model loads all the same."""
    model, ckpt = saved
    (ckpt / "trainer.pt").write_bytes(b"optimizer state")
    write_manifest(ckpt)
    fake = FakeHub({"org/run": {p.name: p.read_bytes() for p in ckpt.iterdir()}})
    home = tmp_path / "hf_home"
    try:
        assert load(home, "org/run", endpoint=fake.endpoint) == weight_sum(model)
    finally:
        fake.close()
    assert not any((home / "hub").glob("models--org--run/snapshots/*/trainer.pt"))
    without = next((home / "hub").glob("models--org--run/snapshots/*"))
    assert ReformerLM(**TINY).init_from(without).new == []  # --init-from that repo: the same
    assert main(["train", "--init-from", str(without), "--data", "duplication", "--seq-len", "16", "--steps", "1",
                 "--batch-size", "1", "--eval-batches", "1", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    (ckpt / "trainer.pt").write_bytes(b"optimizer STATE")  # present, it is still checked
    with pytest.raises(ValueError, match="trainer.pt does not match its checksum"):
        ReformerLM.from_pretrained(ckpt)


def test_the_vocabulary_travels_through_from_pretrained_and_save_pretrained(saved, tmp_path):
    _, ckpt = saved
    loaded = ReformerLM.from_pretrained(ckpt)
    assert loaded.vocab == {"kind": "byte"}
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "vocab.json").read_text()) == {"kind": "byte"}
    (ckpt / "vocab.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="vocab.json: not a JSON object"):
        ReformerLM.from_pretrained(ckpt)


class RecordingApi:
    """Stands in for ``HfApi``: records the calls and the uploaded files' bytes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.calls.append(("create_commit", repo_id, kw, files))
        return "commit-info"


def test_push_to_hub_uploads_the_checkpoint_as_one_commit(saved):
    model, ckpt = saved
    api = RecordingApi()
    info = model.push_to_hub(
        "me/tiny", api=api, private=True, revision="dev", training={"data": "builtin", "steps": 10}
    )
    assert info == "commit-info"
    (_, repo, create), branch, (_, repo2, commit, files) = api.calls
    assert repo == repo2 == "me/tiny" and create == {"private": True, "exist_ok": True}
    # the Hub commits onto a branch that exists: "dev" is created first (as transformers does)
    assert branch == ("create_branch", "me/tiny", {"branch": "dev", "exist_ok": True})
    assert commit == {"commit_message": "Upload ReformerLM", "revision": "dev"}
    assert set(files) == set(hub.CHECKPOINT_FILES)
    # the same bytes save_pretrained writes (weights, card; the config and manifest too)
    for name in files:
        assert files[name] == (ckpt / name).read_bytes(), name
    with pytest.raises(ValueError, match="repo_id must be 'owner/name'"):
        model.push_to_hub("no-owner", api=api)


def test_model_card(saved, tmp_path):
    model, ckpt = saved
    card = (ckpt / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: reformer-torch\n")
    assert "pipeline_tag" not in card  # not causal
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card
    assert "- data: builtin" in card and "- steps: 10" in card
    assert "README.md" not in json.loads((ckpt / MANIFEST_NAME).read_text())["files"]
    (ckpt / "README.md").write_text(card + "\nEdited by hand.\n")  # a card edited by hand still loads
    assert weight_sum(ReformerLM.from_pretrained(ckpt)) == weight_sum(model)
    causal = ReformerLM(**dict(TINY, causal=True))
    causal.save_pretrained(ckpt)  # replaces our own card
    assert "pipeline_tag: text-generation" in (ckpt / "README.md").read_text()


def test_the_card_of_a_classifier_names_its_head_and_a_stack_has_no_vocabulary(tmp_path):
    from reformer import Reformer, ReformerForSequenceClassification

    ReformerForSequenceClassification(**TINY, num_labels=3, pooling="max").save_pretrained(tmp_path / "c")
    assert "| labels / pooling | 3 / max |" in (tmp_path / "c" / "README.md").read_text()
    stack = Reformer(dim=32, depth=1, heads=2, bucket_size=8, hash_seed=1).eval()
    stack.save_pretrained(tmp_path / "s")  # a stack on vectors: no token vocabulary to state
    assert "vocabulary" not in (tmp_path / "s" / "README.md").read_text()
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.equal(Reformer.from_pretrained(tmp_path / "s").eval()(x), stack(x))


def test_a_readme_we_did_not_write_is_left_alone(tmp_path):
    (tmp_path / "README.md").write_text("# My project\n")
    with pytest.warns(UserWarning, match="not written by reformer-torch"):
        ReformerLM(**TINY).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My project\n"


def test_local_paths_stay_local(saved, tmp_path, monkeypatch):
    model, ckpt = saved
    (tmp_path / "org").mkdir()
    os.symlink(ckpt, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert not hub.is_repo_id("org/tiny")  # a directory of that name exists
    assert weight_sum(ReformerLM.from_pretrained("org/tiny")) == weight_sum(model)
    with pytest.raises(ValueError, match="revision='v1' applies to a Hub repo id"):
        ReformerLM.from_pretrained(ckpt, revision="v1")


def test_encoder_decoder_saves_and_loads(tmp_path):
    sizes = dict(enc_num_tokens=20, enc_depth=1, enc_max_seq_len=64, dec_num_tokens=24, dec_depth=1, dec_max_seq_len=64)
    model = ReformerEncDec(dim=32, **sizes, heads=2, bucket_size=8, ignore_index=-1, pad_value=3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path)
    loaded = ReformerEncDec.from_pretrained(tmp_path).eval()
    assert (loaded.ignore_index, loaded.pad_value) == (-1, 3)
    assert loaded.decoder.config == model.decoder.config and loaded.encoder.config == model.encoder.config
    x, y = torch.randint(0, 20, (2, 32)), torch.randint(0, 20, (2, 32))
    assert torch.equal(model(x, y), loaded(x, y))
    assert "| decoder vocabulary | 24 tokens |" in (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="holds a ReformerEncDec, not a ReformerLM"):
        ReformerLM.from_pretrained(tmp_path)


def test_the_cli_takes_repo_ids(saved, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, ckpt = saved
    config = transformers.ReformerConfig(vocab_size=20, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                                         attn_layers=["lsh"], feed_forward_size=32, axial_pos_shape=[4, 16],
                                         axial_pos_embds_dim=[8, 8], max_position_embeddings=64,
                                         lsh_attn_chunk_length=8, num_buckets=8, hash_seed=3,
                                         is_decoder=True)  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.ReformerModelWithLMHead(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    from tiny_tokenizers import metaspace_tokenizer

    metaspace_tokenizer(vocab_size=20).save(str(tmp_path / "hf" / "tokenizer.json"))  # downloaded and kept
    fake = FakeHub({
        "org/tiny": {p.name: p.read_bytes() for p in ckpt.iterdir()},
        "google/tiny-reformer": {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()},
    })  # fmt: skip
    home = tmp_path / "hf_home"
    try:
        converted = cli(home, "convert", "--from-transformers", "google/tiny-reformer", "--out", str(tmp_path / "c"),
                        endpoint=fake.endpoint)  # fmt: skip
        assert converted.returncode == 0, converted.stderr
        assert json.loads((tmp_path / "c" / "vocab.json").read_text())["kind"] == "tokenizer"
        assert cli(home, "generate", "--checkpoint", "org/tiny", "--prompt", "a", "--max-new-tokens", "2",
                   endpoint=fake.endpoint).returncode == 0  # fmt: skip
    finally:
        fake.close()
    ids = torch.randint(0, 20, (1, 64))
    with torch.no_grad():
        assert torch.allclose(ReformerLM.from_pretrained(tmp_path / "c").eval()(ids), theirs(ids).logits, atol=1e-5)
    offline = cli(home, "generate", "--checkpoint", "org/tiny", "--prompt", "a", "--max-new-tokens", "2", "--seed", "1")
    assert offline.returncode == 0, offline.stderr  # from the cache
    evaluated = cli(home, "eval", "--checkpoint", "org/tiny", "--data", "builtin", "--seq-len", "16", "--batches", "1")
    assert evaluated.returncode == 0 and "bits/token" in evaluated.stdout, evaluated.stderr
    missing = cli(home, "generate", "--checkpoint", "org/nothing", "--prompt", "a", "--max-new-tokens", "2")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "org/nothing is not in the Hugging Face cache" in missing.stderr
