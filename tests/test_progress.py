"""Progress bars: live redraws in a terminal, sparse ones in a log file."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from franca.core.progress import LOG_MININTERVAL_S, ProgressBar, is_interactive


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)


def test_log_file_gets_sparse_redraws() -> None:
    log = io.StringIO()
    assert not is_interactive(log)
    with ProgressBar(total=5000, file=log, desc="steps") as bar:
        assert bar.mininterval == LOG_MININTERVAL_S
        for step in range(5000):
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (step + 1):.5f}")  # tqdm's own set_postfix would redraw every time
    # the initial and the final state only, however fast the updates came (tqdm's default would redraw every 0.1 s)
    states = [part for part in log.getvalue().split("\r") if part.strip()]
    assert 1 <= len(states) <= 3
    assert "5000/5000" in states[-1] and "loss=0.00020" in states[-1]


def test_terminal_keeps_tqdm_default_and_explicit_values_win() -> None:
    terminal = FakeTerminal()
    assert is_interactive(terminal)
    with ProgressBar(total=3, file=terminal) as bar:
        assert bar.mininterval == 0.1  # tqdm's own default
        assert bar.dynamic_ncols
    with ProgressBar(total=3, file=io.StringIO(), mininterval=2.0) as bar:
        assert bar.mininterval == 2.0


def test_environment_override_is_respected() -> None:
    # tqdm reads TQDM_* when it is imported, so the override is checked in a fresh interpreter
    code = (
        "import io; from franca.core.progress import ProgressBar; "
        "print(ProgressBar(total=3, file=io.StringIO()).mininterval)"
    )
    env = {**os.environ, "TQDM_MININTERVAL": "5"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert float(result.stdout.strip()) == 5.0


def test_disabled_bar_writes_nothing() -> None:
    log = io.StringIO()
    with ProgressBar(range(10), file=log, disable=True) as bar:
        assert sum(bar) == 45
    assert log.getvalue() == ""
