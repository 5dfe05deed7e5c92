"""What an audit of the command line and the Python API broke (issue 22), kept held: opening a
run never runs code from it, a model is never scored or trained with another vocabulary, one
writer per run directory, nothing of the user's overwritten, numeric checkpoint order, configs
checked field by field, ``--resume`` continues the same run. See docs/reliability.md."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.checkpoint import write_manifest
from reformer.cli import main
from reformer.data import load_corpus
from reformer.train import TrainConfig, checkpoint_dirs, load_checkpoint, train

TRAIN = ["train", "--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--eval-every", "2", "--save-every", "2"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, *argv, match):
    code, out, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def _snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes (symlinks as their targets)."""
    return {
        str(p.relative_to(directory)): os.readlink(p) if p.is_symlink() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run of the tiny preset (copy it before changing it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main([*TRAIN, "--steps", "2", "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


# 1. opening a run never executes code from it ------------------------------------------------


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_and_never_runs(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    latest = checkpoint_dirs(run)[-1]
    torch.save({"step": 2, "history": [], "payload": _RunsACommand(marker)}, latest / "trainer.pt")
    write_manifest(latest)  # a checksum is no signature: the planter rewrites it
    for argv in (["info", run], ["eval", "--checkpoint", run, "--batches", "1"],
                 [*TRAIN, "--steps", "4", "--out", run, "--resume", "--allow-change"]):  # fmt: skip
        _refused(capsys, *argv, match="refusing to load")
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(latest, ReformerLM.from_pretrained(latest))
    assert not marker.exists()


def test_our_own_trainer_state_loads_without_unpickling(run):
    latest = checkpoint_dirs(run)[-1]
    state = torch.load(latest / "trainer.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"] and state["sampler"]["generator"].dtype == torch.uint8


# 2. a character-vocabulary model is scored and trained with its own vocabulary only -------------


def _text(path: Path, alphabet: str, n: int = 4000) -> Path:
    rng = torch.Generator().manual_seed(0)
    path.write_text("".join(alphabet[i] for i in torch.randint(0, len(alphabet), (n,), generator=rng)))
    return path


def test_char_models_use_the_checkpoints_vocabulary(tmp_path, capsys):
    run = tmp_path / "char"
    trained_on = _text(tmp_path / "a.txt", "abcdefgh ")
    assert _run(capsys, *TRAIN, "--vocab", "char", "--data", trained_on, "--steps", "2", "--out", run)[0] == 0
    vocab = (checkpoint_dirs(run)[-1] / "vocab.json").read_text()

    # as many distinct characters, another mapping: refused with the strangers named, not scored
    other = _text(tmp_path / "b.txt", "abcdefgXY")
    _refused(capsys, "eval", "--checkpoint", run, "--data", other, match="characters not in the vocabulary: 'XY'")
    _refused(capsys, *TRAIN, "--vocab", "char", "--data", other, "--steps", "4", "--out", run, "--resume",
             "--allow-change", match="--data")  # fmt: skip
    assert (checkpoint_dirs(run)[-1] / "vocab.json").read_text() == vocab

    # fewer distinct characters, all known: scored with the model's mapping (a rebuilt one had 3 tokens)
    subset = _text(tmp_path / "c.txt", "abc")
    code, out, err = _run(capsys, "eval", "--checkpoint", run, "--data", subset, "--seq-len", "64", "--batches", "1")
    assert code == 0 and "bits/token" in out, err


def test_binary_data_is_refused_for_a_char_vocabulary(tmp_path, capsys):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 20)
    _refused(capsys, *TRAIN, "--vocab", "char", "--data", binary, "--out", tmp_path / "run",
             match="blob.bin is not UTF-8 text (byte 0x80 at offset 128)")  # fmt: skip
    assert not (tmp_path / "run").exists()


# 3. one writer per run directory --------------------------------------------------------------


def test_a_run_in_use_is_refused_and_a_killed_holders_lock_does_not_block(run, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from reformer.runs import run_lock\n"
         "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(run)
        line = _refused(capsys, *TRAIN, "--steps", "4", "--out", run, "--resume", "--allow-change", match="in use")
        assert f"process {holder.pid}" in line
        with pytest.raises(ValueError, match="in use"):  # the Python API too
            corpus = load_corpus("builtin")
            train(ReformerLM.from_pretrained(checkpoint_dirs(run)[-1]), corpus.train, corpus.valid,
                  TrainConfig(steps=4, seq_len=64, batch_size=2), run, resume=True)  # fmt: skip
        assert _snapshot(run) == before  # the holder's run untouched
    finally:
        holder.kill()  # SIGKILL: no chance to clean up; the kernel drops its lock
        holder.wait()
    assert (run / ".lock").exists()
    assert _run(capsys, *TRAIN, "--steps", "4", "--out", run, "--resume", "--allow-change")[0] == 0


# 4. nothing a user already had is overwritten ----------------------------------------------------


def test_out_with_other_files_is_refused_and_left_alone(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.csv").write_text("my numbers\n")
    before = _snapshot(mine)
    _refused(capsys, *TRAIN, "--steps", "2", "--out", mine, match="not a run directory and holds other files (log.csv)")
    assert _snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["log.csv"]
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    _refused(capsys, *TRAIN, "--steps", "2", "--out", not_a_dir, match="not a directory")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    _refused(capsys, *TRAIN, "--steps", "2", "--out", dangling, match="symlink to")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, *TRAIN, "--steps", "2", "--out", empty)[0] == 0  # an empty directory is fine


# 5. checkpoint order is numeric; other names and symlinks are never touched --------------------------


def test_checkpoints_sort_by_step_number(run, capsys):
    root = run / "checkpoints"
    for name in ("step-9999999", "step-10000000"):
        shutil.copytree(checkpoint_dirs(run)[-1], root / name)
    assert [p.name for p in checkpoint_dirs(run)][-2:] == ["step-9999999", "step-10000000"]
    code, out, _ = _run(capsys, "info", run)
    assert code == 0 and json.loads(out)["checkpoint"].endswith("step-10000000")


def test_pruning_ignores_other_names_and_never_follows_symlinks(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    root = run / "checkpoints"
    root.mkdir(parents=True)
    (root / "step-0000000").symlink_to(elsewhere, target_is_directory=True)
    (root / "step-old").mkdir()
    (root / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    corpus = load_corpus("builtin")
    torch.manual_seed(0)
    model = ReformerLM(num_tokens=256, dim=16, depth=1, heads=2, bucket_size=8, max_seq_len=32, causal=True)
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, eval_every=100, eval_batches=1, save_every=1, keep_last=1)
    train(model, corpus.train, corpus.valid, cfg, run)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-0000003"]
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # every file we did not write is intact


# 6. config.json checked field by field ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("causal", None, "causal must be bool, got None"),
        ("causal", "false", "causal must be bool, got 'false'"),
        ("causal", 0, "causal must be bool, got 0"),
        ("use_full_attn", "true", "use_full_attn must be bool"),
        ("norm_eps", "1e-5", "norm_eps must be float"),
        ("dim", 32.0, "dim must be int"),
        ("hash_seed", 2**64, "hash_seed must be an int64"),
        ("format_version", 2, "format_version 2 is newer"),
        ("model_type", "reformer", "reformer convert --from-transformers"),
    ],
)
def test_config_json_is_checked_field_by_field(tmp_path, capsys, field, value, match):
    model = ReformerLM(num_tokens=16, dim=32, depth=1, heads=2, bucket_size=8, max_seq_len=64, causal=True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=match):
        ReformerLM.from_pretrained(tmp_path)
    _refused(capsys, "info", tmp_path, match=match)


def test_axial_positions_must_cover_max_seq_len():
    with pytest.raises(ValueError, match=r"axial_position_shape \(4, 8\) has 32 positions, fewer than max_seq_len=64"):
        ReformerConfig(max_seq_len=64, axial_position_shape=(4, 8))
    ReformerConfig(max_seq_len=64, axial_position_shape=(8, 8))
    ReformerConfig(max_seq_len=64, axial_position_shape=(4, 8), axial_position_emb=False)  # not used: not checked


# 7. --resume continues the same run ----------------------------------------------------------------


def test_resume_refuses_another_run_and_lists_the_differences(run, tmp_path, capsys):
    before = _snapshot(run)
    other_data = _text(tmp_path / "other.txt", "abcdefgh ")
    cases = [
        (["--seq-len", "32"], "--seq-len 32 (run: 64)"),
        (["--data", other_data], f"--data {other_data} (run: builtin)"),
        (["--preset", "small"], "--preset small (run: tiny)"),
        (["--vocab", "char"], "--vocab char (run: byte)"),
        (["--seed", "1", "--lr", "0.01"], "--seed 1 (run: 0); --steps 4 (run: 2); --lr 0.01 (run: 0.002)"),
    ]
    for change, listed in cases:
        argv = [*TRAIN, "--steps", "4", *change, "--out", run, "--resume", "--allow-change"]
        _refused(capsys, *argv, match=listed)
    # a deliberate change of the schedule needs the explicit flag
    _refused(capsys, *TRAIN, "--steps", "4", "--out", run, "--resume", match="--steps 4 (run: 2); pass --allow-change")
    _refused(capsys, *TRAIN, "--steps", "2", "--out", run, "--resume", match="already at step 2")
    _refused(capsys, *TRAIN, "--steps", "1", "--out", run, "--resume", match="already at step 2")
    assert _snapshot(run) == before
    code, out, err = _run(capsys, *TRAIN, "--steps", "4", "--out", run, "--resume", "--allow-change")
    assert code == 0 and "finished step 4" in out, err
    assert json.loads((run / "run.json").read_text())["settings"]["steps"] == 4  # the next resume compares to 4


def test_resume_without_a_run_says_so(tmp_path, capsys):
    _refused(capsys, *TRAIN, "--steps", "2", "--out", tmp_path / "new", "--resume", match="holds no run to resume")
    assert not (tmp_path / "new").exists()


def test_a_run_of_an_earlier_version_resumes_with_its_checkpoints_settings(run, capsys):
    (run / "run.json").unlink()  # runs written before run.json existed
    _refused(
        capsys, *TRAIN, "--steps", "4", "--seq-len", "32", "--out", run, "--resume", match="--seq-len 32 (run: 64)"
    )
    assert _run(capsys, *TRAIN, "--steps", "3", "--out", run, "--resume", "--allow-change")[0] == 0
