"""The layered house (README, "Layout") holds: import-linter's contracts from pyproject.toml pass, and they can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed (the dev extra)")
def test_the_layer_contracts_pass() -> None:
    done = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed (the dev extra)")
def test_the_layer_contracts_catch_an_upward_import(tmp_path: Path) -> None:
    """The same contracts with the core layer made to import the CLI: broken."""
    config = (ROOT / "pyproject.toml").read_text()
    package = tmp_path / "src" / "franca"
    shutil.copytree(ROOT / "src" / "franca", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "core" / "upward.py").write_text("import franca.cli\n")
    (tmp_path / "pyproject.toml").write_text(config)
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "franca.core.upward" in done.stdout, done.stdout[-3000:]
