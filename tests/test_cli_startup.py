"""``reformer --help``, ``reformer COMMAND --help`` and ``reformer --version`` answer without
importing torch (the command modules import it inside ``run``), and the names the parsers spell
out agree with the modules that define them."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

import reformer
from reformer import cli, listops, longctx, reproduce
from reformer.cli import reproduce as reproduce_command

HELP_ARGVS = [
    ["--help"],
    ["--version"],
    *([command, "--help"] for command in cli.COMMANDS),
    *(["reproduce", experiment, "--help"] for experiment in ("duplication", "lm", "longctx", "listops")),
]

# Runs every argv through main() in one fresh interpreter; prints each one's exit code and output,
# then whether torch (or any module of ours that needs it) was imported.
PROBE = """
import contextlib, io, json, sys
from reformer.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append([code, out.getvalue()])
heavy = sorted(m for m in sys.modules if m == "torch" or m in ("reformer.model", "reformer.train"))
print(json.dumps({"results": results, "heavy": heavy}))
"""


def test_help_and_version_import_no_torch():
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HELP_ARGVS)], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    report = json.loads(done.stdout)
    assert report["heavy"] == [], report["heavy"]
    for argv, (code, out) in zip(HELP_ARGVS, report["results"], strict=True):
        assert code == 0, (argv, code)
        expected = f"reformer {reformer.__version__}\n" if argv == ["--version"] else "usage: reformer"
        assert out.startswith(expected), (argv, out[:200])


def test_version_is_the_installed_distributions():
    assert reformer.__version__ == importlib.metadata.version("reformer-torch")
    done = subprocess.run([sys.executable, "-m", "reformer.cli", "--version"], capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert done.stdout == f"reformer {reformer.__version__}\n"


def test_the_console_script_answers():
    script = Path(sys.executable).with_name("reformer")  # pyproject.toml's [project.scripts] entry
    if not script.is_file():
        pytest.skip("the package is not pip-installed into this interpreter's environment (make test installs it)")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout == f"reformer {reformer.__version__}\n"


def test_each_command_module_registers_its_parser_and_run():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert tuple(commands) == cli.COMMANDS
    for name, sub in commands.items():
        module = sys.modules[f"reformer.cli.{name}"]
        assert sub.get_default("func") is module.run, name


def test_the_parsers_offer_the_studies_names():
    assert reproduce_command.DUPLICATION_SCALES == tuple(sorted(reproduce.DUPLICATION_SCALES))
    assert reproduce_command.LONGCTX_SCALES == tuple(sorted(longctx.LONGCTX_SCALES))
    assert reproduce_command.LONGCTX_MODELS == longctx.ALL_MODELS
    assert reproduce_command.LISTOPS_SCALES == tuple(sorted(listops.LISTOPS_SCALES))
    assert reproduce_command.LISTOPS_MODELS == listops.LISTOPS_MODELS


def test_the_package_names_resolve_lazily_to_their_modules():
    import reformer.attention
    import reformer.config
    import reformer.model
    import reformer.wrappers

    assert set(reformer._HOMES) == set(reformer.__all__) - {"__version__"}
    for name, home in reformer._HOMES.items():
        assert getattr(reformer, name) is getattr(sys.modules[f"reformer.{home}"], name)
    assert set(reformer.__all__) <= set(dir(reformer))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        reformer.Nope  # noqa: B018


def test_importing_the_models_imports_no_compiler():
    """``torch._dynamo`` (seconds to import) and ``triton`` load only when something compiles:
    a triton imported early also misses ``TRITON_INTERPRET``, which the CPU tests of the Triton
    kernel set before importing it."""
    code = ("import sys; from reformer import ReformerLM; ReformerLM(num_tokens=8, dim=8, depth=1, heads=1, "
            "bucket_size=4, max_seq_len=16)(__import__('torch').zeros(1, 16, dtype=__import__('torch').long)); "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
