"""Multi-process training: 2 processes under torchrun (gloo, CPU) against 1 process with the
same global batch (DDP and FSDP), resuming with another number of processes, a killed, a
stopped and a terminated process. Every subprocess has a hard timeout and its process group
is killed afterwards, so a hang fails the test instead of blocking the suite."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch
from ddp_worker import run as run_in_process
from safetensors.torch import load_file

from reformer import ReformerLM
from reformer.cli import main
from reformer.train import checkpoint_dirs

WORKER = Path(__file__).with_name("ddp_worker.py")
TIMEOUT = 180
# Dropout 0: dropout masks are drawn per batch shape, so 2 x 2 rows cannot replay 1 x 4 rows'
# masks. LSH rotations are drawn per forward (not per row) from the same seed on every
# process, so training-mode hashing is identical and stays on.
MODEL = dict(num_tokens=256, dim=32, depth=2, heads=2, bucket_size=16, n_hashes=2, max_seq_len=64, causal=True)
# Rows summed in another order (2 processes vs 1) give gradients equal to ~1e-7; AdamW divides
# each by its own root mean square, so elements whose gradient is ~0 can move by up to lr (1e-3)
# a step either way (3e-5 and 4e-5 seen, on different CPUs). A real sharding, averaging or
# resuming bug is off by O(lr) everywhere, and the losses must agree to 1e-5 as well.
ROUNDING_THROUGH_ADAMW = 2e-4
TRAIN = dict(steps=4, seq_len=64, grad_accum=2, lr=1e-3, warmup_steps=1, eval_every=4, eval_batches=2,
             save_every=1, keep_last=10)  # fmt: skip


@contextmanager
def torchrun(*args: str) -> Iterator[subprocess.Popen]:
    """2 processes under torchrun; on the way out the whole process group is killed, so a hung
    worker cannot outlive a failed test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield launcher
    finally:
        with suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def train_2proc(spec: dict) -> None:
    with torchrun(str(WORKER), json.dumps(spec)) as launcher:
        _, err = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 0, "\n".join(line for line in err.splitlines() if "[rank" in line)[-5000:]


def final(run: Path) -> tuple[dict, dict]:
    ckpt = checkpoint_dirs(run)[-1]
    return load_file(ckpt / "model.safetensors"), torch.load(ckpt / "trainer.pt", weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_reversible_blocks_produce_each_parameter_gradient_once():
    """What DDP's gradient hooks need: one accumulation per parameter and backward (even when
    every block shares the parameters), and parameters that are inputs of the graph."""
    model = ReformerLM(**MODEL, reverse_thres=0, weight_tie=True)
    x = torch.randint(0, 256, (2, 64))
    counts = Counter()
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: counts.update([name]))
    model(x).square().mean().backward()
    assert counts == Counter(name for name, _ in model.named_parameters())
    grads = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    assert all(g is not None for g in grads)


CASES = {  # (model options, 2-process training options)
    "reversible": (dict(reverse_thres=0), {}),
    "not reversible": (dict(reverse_thres=10**6), {}),
    # blocks without gradients in some steps: DDP must find them (find_unused_parameters)
    "reversible, layer dropout": (dict(reverse_thres=0, layer_dropout=0.5, depth=3), {}),
    # one set of parameters in every block: its gradient must still reach DDP once
    "reversible, weight tie": (dict(reverse_thres=0, weight_tie=True), {}),
    "reversible, fsdp": (dict(reverse_thres=0), dict(fsdp=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, case):
    model, parallel = {**MODEL, **CASES[case][0]}, CASES[case][1]
    train_2proc({"model": model, "train": {**TRAIN, **parallel, "batch_size": 2}, "out": str(tmp_path / "two")})
    run_in_process({"model": model, "train": {**TRAIN, "batch_size": 4}, "out": str(tmp_path / "one")})
    (two, two_state), (one, one_state) = final(tmp_path / "two"), final(tmp_path / "one")
    diff = max_difference(two, one)
    print(f"{case}: max parameter difference 2 processes vs 1 after {TRAIN['steps']} steps: {diff:.2e}")
    assert diff < ROUNDING_THROUGH_ADAMW
    first = load_file(checkpoint_dirs(tmp_path / "one")[0] / "model.safetensors")
    assert max_difference(first, one) > 1e-3  # the steps moved the weights: the comparison means something
    losses = [[r["loss"] for r in s["history"]] for s in (two_state, one_state)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert two_state["history"][-1]["eval_loss"] == pytest.approx(one_state["history"][-1]["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_with_another_number_of_processes_continues_the_same_run(tmp_path, parallel):
    """2 processes x 2 rows for 2 steps, then 1 process x 4 rows from their checkpoint (DDP), or
    2 processes again (FSDP: the checkpoint's full optimizer state is cut into shards again),
    equal 1 process x 4 rows throughout."""
    model, fsdp = {**MODEL, "reverse_thres": 0}, parallel == "fsdp"
    straight = tmp_path / "straight"
    run_in_process({"model": model, "train": {**TRAIN, "batch_size": 4}, "out": str(straight)})
    two = {"model": model, "train": {**TRAIN, "batch_size": 2, "fsdp": fsdp}, "out": str(tmp_path / "r")}
    train_2proc({**two, "stop_after": 2})
    assert [p.name for p in checkpoint_dirs(tmp_path / "r")][-1] == "step-0000002"
    if fsdp:
        train_2proc({**two, "resume": True})
    else:
        run_in_process({"model": model, "train": {**TRAIN, "batch_size": 4}, "out": two["out"], "resume": True})
    (resumed, state), (expected, expected_state) = final(tmp_path / "r"), final(straight)
    assert state["step"] == TRAIN["steps"]
    assert max_difference(resumed, expected) < ROUNDING_THROUGH_ADAMW
    assert [r["loss"] for r in state["history"]] == pytest.approx([r["loss"] for r in expected_state["history"]],
                                                                  abs=1e-5)  # fmt: skip


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the torchrun worker with ``RANK=rank`` (Linux: read from /proc; any of the
    launcher's threads may have started it)."""
    tasks = Path(f"/proc/{launcher.pid}/task").iterdir()
    for pid in (pid for task in tasks for pid in (task / "children").read_text().split()):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank}")


FAST = ["--preset", "tiny", "--seq-len", "128", "--eval-every", "1000", "--save-every", "2"]


def _signal_rank_1_after_a_checkpoint(run: Path, sig: int, *args: str) -> tuple[subprocess.Popen, str, float]:
    """Start a long 2-process CLI run, send ``sig`` to rank 1 once a checkpoint exists, wait for
    the job to end; return the launcher, its stderr and the seconds from the signal to the end."""
    with torchrun("-m", "reformer.cli", "train", *FAST, "--batch-size", "2", "--steps", "100000", "--out", str(run),
                  *args) as launcher:  # fmt: skip
        deadline = time.time() + TIMEOUT
        while not checkpoint_dirs(run) and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        assert checkpoint_dirs(run), launcher.communicate(timeout=TIMEOUT)[1][-3000:]
        os.kill(_worker_pid(launcher, rank=1), sig)
        sent = time.time()
        _, err = launcher.communicate(timeout=TIMEOUT)
        return launcher, err, time.time() - sent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_killing_one_process_fails_the_job_and_resume_continues(tmp_path, capsys):
    run = tmp_path / "run"
    launcher, err, took = _signal_rank_1_after_a_checkpoint(run, signal.SIGKILL)
    assert launcher.returncode != 0
    assert took < 60, "the surviving process hung"
    assert "SIGKILL" in err  # torchrun's report names the killed process as the root cause
    last = int(checkpoint_dirs(run)[-1].name.split("-")[1])
    # one process with the same global batch takes over from the last checkpoint
    assert main(["train", *FAST, "--batch-size", "4", "--steps", str(last + 2), "--out", str(run), "--resume",
                 "--allow-change"]) == 0  # fmt: skip
    assert f"finished step {last + 2}" in capsys.readouterr().out
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_sigterm_to_every_process_saves_the_same_step(tmp_path):
    """What torchrun does on Ctrl-C: SIGTERM to its workers (here to rank 1 first, then rank 0):
    both stop after the same step, and rank 0 saves it."""
    run = tmp_path / "run"
    with torchrun("-m", "reformer.cli", "train", *FAST, "--save-every", "100000", "--batch-size", "2", "--steps",
                  "100000", "--out", str(run)) as launcher:  # fmt: skip
        log, deadline = run / "log.csv", time.time() + TIMEOUT
        while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
            time.sleep(0.1)
        for rank in (1, 0):
            os.kill(_worker_pid(launcher, rank), signal.SIGTERM)
        out, err = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode != 0 and "exitcode  : 143" in err, err[-3000:]  # each saved, then exited 128 + SIGTERM
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    assert [p.name for p in checkpoint_dirs(run)] == [f"step-{step:07d}"]


@pytest.mark.slow  # ~40 s: torchrun waits 30 s before killing the stopped process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_a_hung_process_fails_the_job_after_the_timeout(tmp_path):
    launcher, err, took = _signal_rank_1_after_a_checkpoint(tmp_path / "run", signal.SIGSTOP, "--dist-timeout", "5")
    assert launcher.returncode != 0
    assert re.search(r"timed? ?out", err, re.IGNORECASE), err[-4000:]  # rank 0 gave up after --dist-timeout
    assert took < 90


def test_fsdp_with_fp16_is_a_clear_error():
    from reformer.train import TrainConfig

    with pytest.raises(ValueError, match="fsdp supports precision fp32 or bf16"):
        TrainConfig(fsdp=True, precision="fp16")


LATE_RANK_1 = """
import os, sys, time
import reformer.runs
from reformer.cli import main
check = reformer.runs.check_out_dir
def late(run):  # rank 1 looks at --out after rank 0 had time to take the run's lock and write run.json
    if os.environ["RANK"] == "1":
        time.sleep(3)
    check(run)
reformer.runs.check_out_dir = late
sys.exit(main(sys.argv[1:]))
"""


def test_every_process_checks_the_output_directory_before_rank_0_writes_into_it(tmp_path):
    script = tmp_path / "late_rank_1.py"
    script.write_text(LATE_RANK_1)
    run = tmp_path / "run"
    with torchrun(str(script), "train", *FAST, "--batch-size", "2", "--steps", "2", "--out", str(run)) as launcher:
        out, err = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 0, err[-3000:]
    assert "finished step 2" in out


def test_a_refusal_on_one_process_ends_every_process_at_once(tmp_path):
    """A bad --out is refused by every process together (no process waits for the others until
    the collective timeout)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("not a run")
    start = time.time()
    with torchrun("-m", "reformer.cli", "train", *FAST, "--steps", "2", "--out", str(tmp_path / "run")) as launcher:
        _, err = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode != 0
    assert err.count("is not a run directory and holds other files (notes.txt)") >= 2, err[-3000:]
    assert time.time() - start < 60
