"""``reformer bench`` argument handling, and benchmarks/training.py's FLOP count, skip rule and
report writer on made-up results (nothing is measured)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reformer.cli import main

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def training(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their sibling `common`
    import training

    return training


def test_bench_without_scripts_is_a_one_line_error(tmp_path, capsys):
    code = main(["bench", "--scripts-dir", str(tmp_path), "training", "--lengths", "1024"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "training.py not found" in err[0] and "--scripts-dir" in err[0]


def test_bench_passes_arguments_and_exit_code_through(tmp_path, capsys):
    (tmp_path / "attention.py").write_text(
        "import json, sys\nopen(sys.argv[0] + '.argv', 'w').write(json.dumps(sys.argv[1:]))\nsys.exit(3)\n"
    )
    code = main(["bench", "--scripts-dir", str(tmp_path), "attention", "--lengths", "1024", "--help"])
    assert code == 3
    assert json.loads((tmp_path / "attention.py.argv").read_text()) == ["--lengths", "1024", "--help"]


def test_bench_rejects_unknown_script(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "memory"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_step_flops_by_hand(training):
    # L=256, depth 1, d=16, bucket 32, 2 hashes, 10 tokens, ff_mult 4 (n_buckets = 256 / 32 = 8).
    # LSH forward: projections 2*256*16^2*3 = 393,216; feed-forward 4*256*16*64 = 1,048,576;
    # attention 8*2*32*256*16 = 2,097,152; head 2*256*16*10 = 81,920 -> 3,620,864, x3 = 10,862,592;
    # hashing 256*16*2*8 = 65,536 once.
    kw = dict(num_tokens=10, dim=16, bucket_size=32, n_hashes=2, ff_mult=4)
    assert training.step_flops(256, 1, dense=False, **kw) == 10_862_592 + 65_536
    # Dense: projections 2*256*16^2*4 = 524,288; causal attention 2*256^2*16 = 2,097,152;
    # same feed-forward and head -> 3,751,936, x3.
    assert training.step_flops(256, 1, dense=True, **kw) == 3 * 3_751_936
    # Depth multiplies the layers (and hashing), not the head.
    two = training.step_flops(256, 2, dense=False, **kw)
    assert two == 10_862_592 + 65_536 + 3 * (393_216 + 1_048_576 + 2_097_152) + 65_536


def test_skip_rule_extrapolates_and_propagates_failures(training):
    done = {("ours", 1024, 6): {"s": 100.0}, ("dense", 1024, 6): {"error": "out of memory"}}
    assert training.skip_reason(done, "ours", 1024, 2, 120.0) is None  # nothing smaller to go by
    skip = training.skip_reason(done, "ours", 2048, 6, 120.0)
    assert skip["skip"].startswith("skipped (est. ") and 200 < skip["est_s"] < 260
    assert training.skip_reason(done, "ours", 2048, 6, 1000.0) is None
    deeper = training.skip_reason({("ours", 1024, 6): {"s": 50.0}}, "ours", 1024, 12, 120.0)
    assert deeper is None or deeper["est_s"] < 120  # from depth 6: about 2x, under the limit
    assert training.skip_reason(done, "dense", 2048, 6, 120.0)["skip"] == "skipped (out of memory at 1,024 x 6)"
    done["dense", 2048, 6] = training.skip_reason(done, "dense", 2048, 6, 120.0)
    assert training.skip_reason(done, "dense", 4096, 6, 120.0)["skip"] == "skipped (out of memory at 1,024 x 6)"


def _fake_report() -> dict:
    times = {"ours": [2.0, 4.0, 8.0], "dense": [1.0, 3.0, 12.0], "reformer_pytorch": [4.0, 10.0, None]}
    cases = []
    for system, seconds in times.items():
        for n, s in zip((1024, 2048, 4096), seconds, strict=True):
            res = {"s": s, "mb": n / 8, "steps": 3} if s else {"skip": "skipped (est. 200 s)", "est_s": 200.0}
            cases.append({"system": system, "length": n, "depth": 6, **res})
        for d in (2, 12):
            cases.append({"system": system, "length": 4096, "depth": d, "s": 1.0, "mb": 100.0 * d})
    return {
        "command": "python benchmarks/training.py --fake",
        "threads": 2,
        "repeats": 3,
        "max_step_seconds": 120.0,
        "length_depth": 6,
        "lengths": [1024, 2048, 4096],
        "depths": [2, 6, 12],
        "depth_lengths": [4096],
        "systems": list(times),
        "not_run": {"transformers": "not installed"},
        "gemm_gflops": [100.0, 90.0],
        "machine": "Machine: fake.",
        "cases": cases,
    }


def test_replot_writes_tables_and_plots(training, tmp_path, capsys):
    (tmp_path / "benchmarks.json").write_text(json.dumps(_fake_report()))
    training.main(["--replot", "--out-dir", str(tmp_path)])
    md = (tmp_path / "benchmarks.md").read_text()
    assert "`python benchmarks/training.py --fake`" in md and "Machine: fake." in md
    assert "| 4,096 | 8.00 s | 12.0 s | skipped (est. 200 s) | 1.50x | - |" in md  # time, ratios vs ours
    assert "| 2,048 | 256 MB | 256 MB | 256 MB | 1.00x | 1.00x |" in md
    assert "drops below dense at about 2,731 tokens" in md  # log-log between 2,048 (4/3) and 4,096 (8/12)
    assert "| 4,096 | 12 | 1,200 MB (1.00 s) |" in md
    assert "`transformers`: not installed." in md and "Skipped cases: 1." in md
    # ours at 1,024: step_flops / 2 s over the 100 GFLOP/s rate (the higher of the two measured).
    rate = training.step_flops(1024, 6, dense=False) / 2.0 / 1e9
    assert f"| 1,024 | {rate:.0f} GFLOP/s ({rate:.0f}%) |" in md
    for name in ("time-vs-length", "memory-vs-length", "memory-vs-depth"):
        assert (tmp_path / f"benchmarks-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_crossover_when_lsh_is_faster_from_the_start(training):
    report = _fake_report()
    for case in report["cases"]:
        if case["system"] == "dense" and "s" in case:
            case["s"] *= 10
    assert "already below dense at the shortest length, 1,024" in training.crossover_text(report, "s", "time")


def test_replot_of_a_stopped_sweep_marks_missing_cases(training, tmp_path, capsys):
    report = _fake_report()
    report["cases"] = [c for c in report["cases"] if c["system"] != "dense" or c["length"] < 4096]
    (tmp_path / "benchmarks.json").write_text(json.dumps(report))
    training.main(["--replot", "--out-dir", str(tmp_path)])
    assert "| 4,096 | 8.00 s | not run | skipped (est. 200 s) | - | - |" in (tmp_path / "benchmarks.md").read_text()


def test_profile_attention_accounts_for_the_step(tmp_path):
    # Run as a script (it instruments modules in its own process); its parts add up to the step.
    out = tmp_path / "profile.md"
    script = str(BENCHMARKS / "profile_attention.py")
    done = subprocess.run(
        [sys.executable, script, "--length", "300", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = {
        line.split("|")[1].strip(): float(line.split("|")[2].replace(",", ""))
        for line in out.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| part")
    }
    total = rows["whole step"]
    top = ["hashing", "window attention forward", "window attention backward", "projections, head reshapes, autograd"]
    assert all(rows[name] >= 0 for name in rows)
    assert abs(sum(rows[name] for name in top) - total) <= 0.02 * total + 1
    assert rows["window attention forward"] > 0 and rows["window attention backward"] > 0
    assert "| hashing | " in out.read_text() and "1 calls" in out.read_text()  # (under 1 ms at 300 tokens)
    assert 0 < rows["batched matmuls"] <= rows["window attention forward"] + rows["window attention backward"]


def test_bucket_recall_compares_exact_and_factorised_buckets(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bucket_recall

    assert bucket_recall.factorised(256) == (16, 16)
    first, second = bucket_recall.factorised(130)
    assert first % 2 == 0 and second % 2 == 0 and first * second >= 130
    out = tmp_path / "recall.md"
    bucket_recall.main(["--length", "2048", "--clusters", "16", "--out", str(out)])
    rows = [
        line.split("|")[1:-1]
        for line in out.read_text().splitlines()
        if line.startswith("| exact") or line.startswith("| factorised")
    ]
    assert [r[0].strip() for r in rows] == ["exact 32", "factorised 6x6"]
    assert [int(r[1]) for r in rows] == [16, 6]  # projections per round: n/2 exact, (6 + 6)/2 factorised
    assert all(0 <= float(x) <= 1 for r in rows for x in r[2:5])


def test_page_faults_compares_the_allocator_settings(tmp_path):
    # glibc's default, its heap kept, the caching allocator. 8K tokens: the layer's packed rows
    # (50 MB) and probabilities (100 MB) are over glibc's largest mmap threshold, so with its
    # defaults each step faults them in again.
    out = tmp_path / "faults.md"
    script = str(BENCHMARKS / "page_faults.py")
    done = subprocess.run(
        [sys.executable, script, "--attention-lengths", "8192", "--lm-lengths", "--repeats", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| `LSH")]
    assert len(rows) == 1 and rows[0][1].strip() == "8,192"
    default_faults, heap_faults, pool_faults = (int(cell.split("/")[2].replace(",", "")) for cell in rows[0][2:5])
    # at least the packed rows' pages (glibc's dynamic mmap threshold keeps some blocks across steps,
    # more or fewer from run to run: 24-43K faults measured, so the probabilities' 25.6K is no floor)
    assert default_faults > 50 * 2**20 // 4096
    assert pool_faults < default_faults / 10  # the caching allocator reuses every page
    # glibc's kept heap still grows and trims now and then: 16.9K against 48.2K once on a loaded machine
    assert heap_faults < default_faults / 2
