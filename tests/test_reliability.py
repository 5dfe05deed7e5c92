"""What an audit of the command line and the Python API broke (issue 22), kept held: opening a
run never runs code from it, a model is never scored or trained with another vocabulary, one
writer per run directory, nothing of the user's overwritten, numeric checkpoint order, configs
checked field by field, ``--resume`` continues the same run. See docs/reliability.md."""

import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.checkpoint import write_manifest
from reformer.cli import main
from reformer.data import ByteVocab, WindowSampler, load_corpus
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


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the interop extra")
def test_convert_refuses_a_planted_pickle_in_a_hugging_face_checkpoint(tmp_path, capsys):
    import transformers

    hf = tmp_path / "hf"
    transformers.ReformerConfig(vocab_size=32, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                                attn_layers=["lsh"], axial_pos_shape=[4, 8], axial_pos_embds_dim=[8, 8],
                                max_position_embeddings=32, is_decoder=True, feed_forward_size=16,
                                lsh_attn_chunk_length=8, num_buckets=4).save_pretrained(hf)  # fmt: skip
    marker = tmp_path / "pwned"
    torch.save({"weight": _RunsACommand(marker)}, hf / "pytorch_model.bin")
    _refused(capsys, "convert", "--from-transformers", str(hf), "--out", str(tmp_path / "out"),
             match="refusing to load the weights")  # fmt: skip
    assert not marker.exists() and not (tmp_path / "out").exists()


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


def test_pruning_ignores_other_names_and_never_follows_symlinks(tmp_path, tiny_lm):
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
    model = tiny_lm(dim=16, max_seq_len=32)
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, eval_every=100, eval_batches=1, save_every=1, keep_last=1)
    train(model, corpus.train, corpus.valid, cfg, run)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-0000003"]
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # every file we did not write is intact


# 6. config.json checked field by field ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("causal", None, "causal must be True or False, got None"),
        ("causal", "false", "causal must be True or False, got 'false'"),
        ("causal", 0, "causal must be True or False, got 0"),
        ("use_full_attn", "true", "use_full_attn must be True or False"),
        ("norm_eps", "1e-5", "norm_eps must be float"),
        ("dim", 32.0, "dim must be int"),
        ("hash_seed", 2**64, "hash_seed must be an int64"),
        ("format_version", 2, "format_version 2 is newer"),
        ("model_type", "reformer", "reformer convert --from-transformers"),
    ],
)
def test_config_json_is_checked_field_by_field(tmp_path, capsys, field, value, match, tiny_lm):
    model = tiny_lm(num_tokens=16)
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


# 8. a really full disk (a small tmpfs, mounted in a private user + mount namespace) ----------------------


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs Linux user namespaces to mount a private tmpfs")
def test_a_full_disk_is_a_one_line_error_and_keeps_the_previous_checkpoint(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    worker = Path(__file__).with_name("disk_full_worker.py")
    done = subprocess.run(["unshare", "-rm", sys.executable, str(worker), str(mnt)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert "No space left on device" in summary["cli, 0 bytes free"]  # run.json (JSON) could not be written
    assert "model.safetensors" in summary["cli, 65536 bytes free"]  # safetensors
    assert "trainer.pt" in summary["api: first free space at which each file's write failed"]  # torch.save


_FILE_SIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from reformer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_writes_failing_at_the_file_level_are_a_one_line_error_on_any_platform(run):
    """Where no tmpfs can be mounted the test above is skipped; this one needs only
    RLIMIT_FSIZE: the kernel refuses every write past 16 KiB, as a full disk refuses them."""
    before = _snapshot(run / "checkpoints")
    argv = [*TRAIN, "--steps", "4", "--out", str(run), "--resume", "--allow-change"]
    done = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMITED, str(16 * 1024), *argv], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if "error" in line]  # (stderr has the progress bar too)
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-4000:]
    assert errors[0].startswith("reformer train: error: could not write ") and "File too large" in errors[0]
    after = _snapshot(run / "checkpoints")
    assert {k: v for k, v in after.items() if k in before} == before  # the previous checkpoint untouched
    latest = checkpoint_dirs(run)[-1]
    assert latest.name == "step-0000002"
    load_checkpoint(latest, ReformerLM.from_pretrained(latest))  # and loadable


# 9. signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGHUP, 143), (signal.SIGTERM, 143)])
def test_hangup_and_terminate_save_a_checkpoint_and_exit_128_plus(tmp_path, capsys, sig, code):
    run = tmp_path / "run"

    def send_once_training():
        log, deadline = run / "log.csv", time.monotonic() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)  # handled in the main thread, at the end of the step

    threading.Thread(target=send_once_training, daemon=True).start()
    returned, out, err = _run(capsys, *TRAIN, "--steps", "100000", "--save-every", "100000", "--out", run)
    assert returned == code, err
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    assert [p.name for p in checkpoint_dirs(run)] == [f"step-{step:07d}"]


# 10. every flag and config field range-checked --------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--lr", "inf"], "argument --lr: must be a finite number"),
        (["--lr", "nan"], "argument --lr: must be a finite number"),
        (["--dist-timeout", "inf"], "argument --dist-timeout: must be a finite number"),
        (["--dist-timeout", "1e300"], "argument --dist-timeout: must be in"),
        (["--seed", str(2**63)], "argument --seed: must be <="),
        (["--seed", "1.5"], "argument --seed: expected an integer"),
        (["--device", "foo"], "argument --device: expected cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:7"], "argument --device: 'cuda:7'"),
        (["--device", "meta"], "argument --device: expected cpu"),
    ],
)
def test_flags_out_of_range_are_one_line_errors(tmp_path, capsys, argv, match):
    if argv == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as exit_info:
        main([*TRAIN, "--steps", "2", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("command", "match"),
    [(["generate", "--prompt", "a", "--seed", "-9223372036854775809"], "argument --seed"),
     (["generate", "--prompt", "a", "--temperature", "inf"], "argument --temperature: must be a finite number"),
     (["eval", "--device", "cuda:7"], "argument --device")],
)  # fmt: skip
def test_generate_and_eval_flags_are_range_checked(trained, capsys, command, match):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as exit_info:
        main([command[0], "--checkpoint", str(trained), *command[1:]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and match in err, err


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("lr", float("inf"), "lr must be a finite number"), ("weight_decay", float("inf"), "weight_decay must be"),
     ("clip_grad", float("nan"), "clip_grad must be"), ("seed", 2**63, "seed must be an int64"),
     ("seed", 1.5, "seed must be an int64")],
)  # fmt: skip
def test_train_config_fields_are_range_checked(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_a_backend_that_cannot_run_here_is_named(tmp_path, capsys, monkeypatch, tiny_lm):
    model = tiny_lm(attn_backend="triton")
    model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        _refused(capsys, "eval", "--checkpoint", tmp_path / "ckpt", match="attn_backend 'triton' needs --device cuda")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
    )
    _refused(capsys, "generate", "--checkpoint", tmp_path / "ckpt", "--prompt", "a",
             match="attn_backend 'triton' needs the triton package")  # fmt: skip


# 11. out of memory, and data that does not fit in memory -----------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits the address space with RLIMIT_AS")
def test_out_of_memory_says_what_to_lower(tmp_path):
    limit = 6 << 30  # address space: enough for torch, far too little for a batch of 512 x 16K tokens
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            "from reformer.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    argv = ["train", "--preset", "tiny", "--seq-len", "16384", "--batch-size", "512", "--steps", "1",
            "--out", str(tmp_path / "run")]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-3000:]
    assert "out of memory" in errors[0] and "lower --batch-size" in errors[0] and "--seq-len" in errors[0]
    assert not checkpoint_dirs(tmp_path / "run")


def _resident_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc")
def test_a_byte_data_file_is_memory_mapped_not_read(tmp_path):
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(4 << 30)  # 4 GiB, sparse: reading it in would take 4 GiB (32 GiB as int64 ids)
    before = _resident_mb()
    corpus = load_corpus(str(big))
    batch = WindowSampler(corpus.train, 64, 2).next_batch()
    grew = _resident_mb() - before
    assert grew < 200, f"resident set grew by {grew:.0f} MB"
    assert corpus.train.dtype == torch.uint8 and len(corpus.train) + len(corpus.valid) == 4 << 30
    assert batch.dtype == torch.long and tuple(batch.shape) == (2, 65)


# 13. clear messages --------------------------------------------------------------------------------


def test_data_that_is_not_a_regular_file_is_named(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for data, match in [(tmp_path, "is a directory"), (fifo, "is not a regular file (a FIFO"),
                        ("/dev/zero", "is not a regular file")]:  # fmt: skip
        _refused(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run", match=match)
    short_valid = tmp_path / "short.txt"
    short_valid.write_text("x" * 1000)  # 5% of 1,000 bytes validate: 50, too few for --seq-len 64
    _refused(capsys, *TRAIN, "--data", short_valid, "--out", tmp_path / "run",
             match=f"the validation split of --data {short_valid}: the data has 50 tokens, too few")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_prompt_that_is_not_utf8_is_named(trained, capsys):
    _refused(capsys, "generate", "--checkpoint", trained, "--prompt", "caf\udce9", match="--prompt is not UTF-8")


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [("manifest.json", '{"files": {"model.safetensors": {}}}', "manifest.json does not list files"),
     ("manifest.json", '{"files": [1, 2]}', "manifest.json does not list files"),
     ("manifest.json", '{"files": {"../../x": {"bytes": 1, "sha256": "0"}}}', "manifest.json does not list files"),
     ("vocab.json", "[1]", "corrupt"), ("vocab.json", "{", "corrupt"),
     ("vocab.json", '{"kind": "char", "chars": 5}', "corrupt")],
)  # fmt: skip
def test_malformed_checkpoint_json_is_named(run, capsys, name, text, match):
    (checkpoint_dirs(run)[-1] / name).write_text(text)
    _refused(capsys, "generate", "--checkpoint", run, "--prompt", "a", "--max-new-tokens", "1", match=match)


# 15. checkpoints get the user's permissions ------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_are_written_with_the_users_umask(tmp_path, umask, tiny_lm):
    previous = os.umask(umask)
    try:
        corpus = load_corpus("builtin")
        torch.manual_seed(0)
        model = tiny_lm(dim=16, max_seq_len=32)
        cfg = TrainConfig(steps=1, batch_size=2, seq_len=32, eval_every=100, eval_batches=1)
        train(model, corpus.train, corpus.valid, cfg, tmp_path, vocab=ByteVocab().to_dict())
    finally:
        os.umask(previous)
    latest = checkpoint_dirs(tmp_path)[-1]
    assert latest.stat().st_mode & 0o777 == 0o777 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in latest.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and len(modes) == 6, modes  # README.md too


# 16. figures the user reads are true ---------------------------------------------------------------------


def test_tokens_per_second_is_tokens_over_wall_time(tmp_path, capsys, monkeypatch):
    import reformer.cli.train as train_command

    clock = iter([0.0, 100.0])  # the run's start and end, as the command reads them
    monkeypatch.setattr(train_command, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    code, out, err = _run(capsys, *TRAIN, "--steps", "4", "--out", tmp_path / "run")
    assert code == 0, err
    assert "5 tokens/s (512 tokens in 100 s)" in out  # 4 steps x 2 x 64 tokens / 100 s


def test_eval_scores_trainings_windows_and_says_when_it_does_not(trained, capsys):
    with (trained / "log.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row["eval_bpc"]][-1]
    code, out, _ = _run(capsys, "eval", "--checkpoint", trained)
    assert code == 0 and f"{float(logged['eval_bpc']):.4f} bits/token" in out and "not comparable" not in out, out
    assert "4 x 2 windows of 64 tokens, seed 1, of builtin" in out
    code, out, _ = _run(capsys, "eval", "--checkpoint", trained, "--batch-size", "1")
    assert code == 0 and "not comparable with training's validation bpc" in out and "batch_size 2" in out, out
