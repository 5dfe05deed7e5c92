"""Run by ``test_reliability.py`` inside ``unshare --user --map-root-user --mount``: mounts a small
tmpfs at ``argv[1]`` (visible to this process only) and fills it, so that writes fail for real with
ENOSPC, then checks what a full disk does to a training run. Prints a JSON summary; exits non-zero
(with the failed assertion) if anything does not hold."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from builders import tiny_lm

from reformer import ReformerLM
from reformer.cli import main
from reformer.data import ByteVocab, WindowSampler, load_corpus
from reformer.train import TrainConfig, TrainState, build_optimizer, checkpoint_dirs, load_checkpoint, save_checkpoint

PAGE = 4096
TRAIN = ["train", "--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--eval-every", "2", "--save-every", "2"]


def free_bytes(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


@contextlib.contextmanager
def leaving_free(mnt: Path, free: int):
    """Fill the file system up to ``free`` bytes left (fallocate: real pages, not a sparse file)."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        if free_bytes(mnt) > free:
            os.posix_fallocate(fd, 0, free_bytes(mnt) - free)
        yield
    finally:
        os.close(fd)
        filler.unlink()


def cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def assert_intact(run: Path, step: int) -> None:
    latest = checkpoint_dirs(run)[-1]
    assert latest.name == f"step-{step:07d}", latest
    assert load_checkpoint(latest, ReformerLM.from_pretrained(latest))["step"] == step
    assert not list((run / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left"


def main_check(mnt: Path) -> dict:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], check=True)
    summary = {}

    # the command line: a run, then a resume that finds the disk full at various points
    run = mnt / "run"
    code, err = cli(*TRAIN, "--steps", "2", "--out", run)
    assert code == 0, err
    for left in (0, 64 * 1024):  # run.json, then the checkpoint files fail first
        with leaving_free(mnt, left):
            code, err = cli(*TRAIN, "--steps", "4", "--out", run, "--resume", "--allow-change")
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert code == 2 and "Traceback" not in err and len(errors) == 1, err
        assert err.rstrip().endswith(errors[0].rstrip()), err  # the error is the last line
        summary[f"cli, {left} bytes free"] = errors[0].split("\r")[-1]
        assert_intact(run, 2)

    # every file of a checkpoint: the failing write moves through them as the free space grows
    torch.manual_seed(0)
    model = tiny_lm()
    cfg = TrainConfig(steps=10, batch_size=2, seq_len=64, keep_last=2)
    optimizer, corpus = build_optimizer(model, cfg), load_corpus("builtin")
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()  # optimizer state of full size
    sampler, vocab = WindowSampler(corpus.train, 64, 2), ByteVocab().to_dict()
    api = mnt / "api"
    save_checkpoint(api, model, optimizer, sampler, TrainState(step=1), cfg, vocab)
    needed = sum(p.stat().st_size for p in checkpoint_dirs(api)[0].iterdir())
    failed_in = {}
    for left in range(0, needed + 8 * PAGE, PAGE):
        with leaving_free(mnt, left):
            try:
                save_checkpoint(api, model, optimizer, sampler, TrainState(step=2), cfg, vocab)
            except OSError as exc:
                message = str(exc)
                name = next((n for n in ("model.safetensors", "config.json", "manifest.json", "vocab.json",
                                         "trainer.pt") if n in message), message)  # fmt: skip
                failed_in.setdefault(name, left)
                assert_intact(api, 1)
                continue
        break  # it fitted
    summary["api: first free space at which each file's write failed"] = failed_in
    assert {"model.safetensors", "config.json", "manifest.json", "trainer.pt"} <= set(failed_in), failed_in
    assert [p.name for p in checkpoint_dirs(api)] == ["step-0000001", "step-0000002"]  # then it fitted
    return summary


if __name__ == "__main__":
    print(json.dumps(main_check(Path(sys.argv[1]))))
