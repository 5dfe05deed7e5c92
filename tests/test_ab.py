"""benchmarks/ab.py: the other commit's package imported beside ours, and an A/B of a commit
against itself giving the same outputs (what a behaviour-preserving refactor must show)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
REPO = BENCHMARKS.parent


@pytest.fixture
def ab(monkeypatch):
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ab

    monkeypatch.setitem(ab.CASES, "attention-tiny", ("attention", 256))
    monkeypatch.setitem(ab.CASES, "training-tiny", ("training", 256))
    monkeypatch.setattr(ab, "ATTENTION", dict(ab.ATTENTION, dim=32, heads=2, bucket_size=16))
    monkeypatch.setattr(ab, "TRAINING", dict(ab.TRAINING, dim=32, heads=2, depth=1, bucket_size=16))
    yield ab
    sys.modules.pop(ab.BASE_NAME, None)


def test_base_package_is_imported_under_its_own_name(ab, tmp_path):
    base = ab.import_base("HEAD", tmp_path)
    assert base.__name__ == "reformer_base"
    assert Path(base.__file__).is_relative_to(tmp_path)
    assert base.ReformerLM.__module__.startswith("reformer_base.")


@pytest.mark.parametrize("case", ["attention-tiny", "training-tiny"])
def test_a_commit_against_itself_has_equal_outputs(ab, tmp_path, monkeypatch, case):
    # HEAD's package beside the working tree's: equal where the working tree has no edits to
    # reformer/, which is how CI runs (a clean clone).
    status = ["git", "-C", str(REPO), "status", "--porcelain", "reformer"]
    dirty = subprocess.run(status, capture_output=True, text=True).stdout
    if dirty:
        pytest.skip("reformer/ has uncommitted changes")
    result = ab.run_case(ab.import_base("HEAD", tmp_path), case, rounds=2)
    assert result["same_weights"]
    assert result["max_diff"] == 0.0
    assert result["base_ms"] > 0 and result["ours_ms"] > 0
    assert result["ratio_lo"] <= result["ratio"] <= result["ratio_hi"]


def test_weights_are_not_shared_when_names_differ(ab):
    import torch

    a, b = torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert not ab.share_weights(a, b)
