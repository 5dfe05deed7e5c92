"""The prepared GPU run (benchmarks/gpu_check.sh, benchmarks/gpu.py) checked on the CPU before
any GPU time is spent on it: the dry run, the sweep's skip and extrapolation rule, and that a
failing backend is recorded while the sweep goes on."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their sibling `common`
    import gpu

    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    monkeypatch.setattr(gpu, "DTYPE", __import__("torch").float32)
    return gpu


def _args(tmp_path, **overrides) -> argparse.Namespace:
    args = dict(lengths=[64, 2048], n_hashes=[1], backends=["chunked", "sdpa"], case_seconds=1e-9,
                deadline=float("inf"), out_dir=tmp_path)  # fmt: skip
    return argparse.Namespace(**{**args, **overrides})


def test_slow_cases_are_skipped_and_dense_is_extrapolated_quadratically(gpu, tmp_path):
    gpu.Sweep(_args(tmp_path)).run()
    rows = {(r["backend"], r["tokens"]): r for r in json.loads((tmp_path / "attention.json").read_text())}
    assert "status" not in rows["chunked", 64] and rows["chunked", 64]["ms"] > 0
    assert rows["chunked", 2048]["status"].startswith("not run (estimated over --case-seconds)")
    assert rows["sdpa", 2048]["status"] == "extrapolated"
    assert rows["sdpa", 2048]["ms"] == pytest.approx(rows["sdpa", 64]["ms"] * 32**2)
    assert rows["chunked", 64]["speedup_vs_sdpa"] == pytest.approx(rows["sdpa", 64]["ms"] / rows["chunked", 64]["ms"])
    table = (tmp_path / "attention.md").read_text()
    assert "(extrapolated)" in table and "not run (estimated" in table


def test_a_failing_backend_is_recorded_and_the_sweep_goes_on(gpu, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("PTX compile failed\nmore detail")

    monkeypatch.setattr(gpu, "lsh_step", broken)
    gpu.Sweep(_args(tmp_path, case_seconds=60.0, lengths=[64])).run()
    rows = {r["backend"]: r for r in json.loads((tmp_path / "attention.json").read_text())}
    assert rows["chunked"]["status"] == "error: RuntimeError: PTX compile failed"
    assert "ms" in rows["sdpa"] and "status" not in rows["sdpa"]


def test_no_case_starts_after_the_deadline(gpu, tmp_path):
    gpu.Sweep(_args(tmp_path, deadline=-1.0, lengths=[64])).run()
    rows = json.loads((tmp_path / "attention.json").read_text())
    assert [r["status"] for r in rows] == ["not run (--deadline reached)"] * 2


def test_gpu_check_dry_run_on_cpu_skips_the_cuda_parts(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run([str(BENCHMARKS / "gpu_check.sh"), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "no CUDA device: dry run" in summary
    assert "dry run of benchmarks/gpu.py on the CPU: exit 0" in summary
    assert "torch " in summary and "MISSING" not in summary
    rows = json.loads((tmp_path / "attention.json").read_text())
    assert {r["backend"] for r in rows} == {"chunked", "sdpa", "flex", "triton"}
    assert [r["tokens"] for r in json.loads((tmp_path / "model.json").read_text())] == [256]
