"""``reformer bench``: run a benchmark script of the source checkout with this interpreter."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .options import UsageError

#: ``benchmarks/`` of the source checkout this package runs from; a wheel does not ship it.
BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
BENCHMARK_SCRIPTS = ("training", "attention", "generate", "profile_attention", "bucket_recall", "page_faults")


def add_parser(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    b = subparsers.add_parser("bench", help="run a benchmark script of the source checkout", formatter_class=fmt)
    b.add_argument("--scripts-dir", default=str(BENCHMARKS_DIR), help="directory of the benchmark scripts")
    b.add_argument("script", choices=BENCHMARK_SCRIPTS, help="runs benchmarks/SCRIPT.py (tables and plots in docs/)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script, e.g. --lengths 1024 4096")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``SCRIPT.py`` of the benchmarks directory; its exit code is ours."""
    script = Path(args.scripts_dir) / f"{args.script}.py"
    if not script.is_file():
        raise UsageError(
            f"{script} not found: the benchmark scripts are not part of the installed package; run from a "
            "clone of the repository (pip install -e '.[bench]') or pass --scripts-dir"
        )
    return subprocess.run([sys.executable, str(script), *args.args]).returncode
