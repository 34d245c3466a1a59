"""``franca --help`` and ``franca <command> --help`` import no torch (it takes seconds to import); commands import it
when they run. Each case runs ``python -m franca ...`` in a fresh interpreter and looks at ``sys.modules`` afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from franca.cli import COMMANDS
from franca.cli.eval import PROTOCOLS

ROOT = Path(__file__).resolve().parents[1]

# Runs ``python -m franca ARGS`` (as ``franca/__main__.py`` does), after PRELUDE, then reports whether torch was imported.
PROBE = """
import runpy, sys
{prelude}
sys.argv = ["franca", *{argv!r}]
try:
    runpy.run_module("franca", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    status = exit.code
print("exit status:", status)
print("torch imported:", "torch" in sys.modules)
"""


def _probe(argv: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    code = PROBE.format(argv=argv, prelude=prelude)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _help_cases() -> list[list[str]]:
    cases = [["--help"], *([name, "--help"] for name in COMMANDS)]
    cases += [["eval", protocol, "--help"] for protocol in PROTOCOLS]
    return cases + [["data", "synth", "--help"], ["checkpoint", "consolidate", "--help"]]


@pytest.mark.parametrize("argv", _help_cases(), ids=" ".join)
def test_help_imports_no_torch(argv: list[str]) -> None:
    done = _probe(argv)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-2:] == ["exit status: 0", "torch imported: False"], done.stdout[-2000:]
    assert lines[0].startswith("usage: franca")


def test_the_probe_sees_torch_when_something_imports_it() -> None:
    """The probe itself can fail: a command-line run after a torch import reports it."""
    done = _probe(["--help"], prelude="import franca.features.extract")
    assert done.stdout.splitlines()[-1] == "torch imported: True", done.stderr[-2000:]


def test_the_token_vocabulary_and_feature_files_import_no_torch() -> None:
    code = (
        "import sys, franca.features, franca.features.tokens, franca.features.files\n"
        "from franca.features import canonical_token, OUTPUT_SUFFIXES\n"
        "print(canonical_token('mean'), OUTPUT_SUFFIXES, 'torch' in sys.modules)\n"
        "from franca.features import extract_features\n"
        "print(extract_features.__module__, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "pooled ('.npy', '.safetensors') False",
        "franca.features.extract True",
    ]
