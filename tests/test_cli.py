"""The ``reformer`` command end to end in a temporary directory, and its one-line errors."""

import json

import pytest

from reformer.cli import main

FAST = ["--preset", "tiny", "--seq-len", "256", "--batch-size", "2", "--eval-every", "3", "--save-every", "3"]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_generate_info(tmp_path, capsys):
    run = str(tmp_path / "run")
    code, out, err = _run(capsys, "train", *FAST, "--steps", "6", "--out", run)
    assert code == 0, err
    assert "validation bpc" in out and "tokens/s" in out
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == 7
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

    code, out, _ = _run(capsys, "train", *FAST, "--steps", "9", "--out", run, "--resume", "--allow-change")
    assert code == 0 and "finished step 9" in out

    code, out, _ = _run(capsys, "eval", "--checkpoint", run, "--seq-len", "256", "--batches", "1")
    assert code == 0 and "bits/token" in out

    code, out, _ = _run(capsys, "generate", "--checkpoint", run, "--prompt", "The ", "--max-new-tokens", "20",
                        "--seed", "1")  # fmt: skip
    assert code == 0 and out.startswith("The ") and len(out.encode()) >= 5
    code, recomputed, _ = _run(capsys, "generate", "--checkpoint", run, "--prompt", "The ", "--max-new-tokens", "20",
                               "--seed", "1", "--no-cache")  # fmt: skip
    assert code == 0 and recomputed == out  # the cache changes the speed, not the text

    code, out, _ = _run(capsys, "info", run)
    info = json.loads(out)
    assert code == 0 and info["step"] == 9 and info["parameters"] > 1000 and info["best_eval_bpc"] < 8
    assert info["vocabulary"] == {"kind": "byte"}


def _assert_clean_error(code, out, err, match):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err


def test_bad_inputs_are_one_line_errors_and_overwrite_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_text("too short " * 20)
    for argv, match in [
        (["train", *FAST, "--data", str(tmp_path / "missing.txt"), "--out", str(run)], "not found"),
        (["train", *FAST, "--data", str(empty), "--out", str(run)], "empty"),
        (["train", *FAST, "--data", str(short), "--out", str(run)], "too few"),
        (["train", *FAST, "--preset", "huge", "--out", str(run)], "unknown preset"),
        (["eval", "--checkpoint", str(tmp_path / "nothing")], "no checkpoint"),
    ]:
        _assert_clean_error(*_run(capsys, *argv), match)
    assert not (run / "checkpoints").exists()

    assert _run(capsys, "train", *FAST, "--steps", "3", "--out", str(run))[0] == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    _assert_clean_error(*_run(capsys, "train", *FAST, "--steps", "3", "--out", str(run)), "already holds a run")
    # a checkpoint for another vocabulary
    _assert_clean_error(*_run(capsys, "train", *FAST, "--vocab", "char", "--steps", "6", "--out", str(run), "--resume",
                              "--allow-change"), "--vocab char (run: byte)")  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before

    ckpt = run / "checkpoints" / before[-1]
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    _assert_clean_error(*_run(capsys, "eval", "--checkpoint", str(run)), "corrupt")
    (ckpt / "config.json").write_text("{")
    _assert_clean_error(*_run(capsys, "info", str(run)), "corrupt")


def test_every_command_documents_its_options(capsys):
    for command in ("train", "eval", "generate", "info"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: reformer " + command in capsys.readouterr().out


def test_duplication_task_from_the_command_line(tmp_path, capsys):
    run = str(tmp_path / "dup")
    code, out, err = _run(capsys, "train", *FAST, "--data", "duplication", "--steps", "3", "--out", run)
    assert code == 0, err
    code, out, _ = _run(capsys, "eval", "--checkpoint", run, "--data", "duplication", "--seq-len", "256",
                        "--batches", "1")  # fmt: skip
    assert code == 0 and "bits/token" in out


def test_sigint_saves_a_checkpoint_and_resume_continues(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "reformer.cli", "train", *FAST, "--steps", "1000", "--save-every", "1000",
           "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # 128 + SIGINT, as a shell reports an interrupted command
    assert "interrupted at step" in out
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    assert (run / "checkpoints" / f"step-{step:07d}").is_dir()
    assert main(["train", *FAST, "--steps", str(step + 2), "--out", str(run), "--resume", "--allow-change"]) == 0
