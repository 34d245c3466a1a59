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
@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        ("core/upward.py", "import franca.cli\n", "layers"),  # core made to import the CLI
        (
            "models/rasa_upward.py",
            "import franca.models.checkpoints\n",
            "models floors",
        ),  # the old rasa cycle
    ],
)
def test_the_layer_contracts_catch_an_upward_import(
    tmp_path: Path, module: str, statement: str, contract: str
) -> None:
    """The same contracts with one module made to import a floor above it: that contract is broken."""
    config = (ROOT / "pyproject.toml").read_text()
    package = tmp_path / "src" / "franca"
    shutil.copytree(ROOT / "src" / "franca", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / module).write_text(statement)
    if module.startswith("models/"):  # a module of the rasa floor: rasa itself imports it
        rasa = package / "models" / "rasa.py"
        rasa.write_text(rasa.read_text() + "\nfrom franca.models import rasa_upward  # noqa\n")
    (tmp_path / "pyproject.toml").write_text(config)
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode != 0 and f"{contract} BROKEN" in done.stdout, done.stdout[-3000:]
