"""Headless Chromium helpers for the report tests: find (or install) the browser, dump a page's DOM, screenshot it.

The browser is Debian's ``chromium`` package. When it is missing and the process runs as root with ``apt-get`` on
PATH, :func:`find_or_install_chromium` installs it (``apt-get update`` then ``apt-get install -y chromium``); anywhere
else it returns ``None`` so that the caller can skip with a clear reason. Chromium is always started with the flags
that work on a closed-network machine (no background networking, no component updates, no sync, no QUIC) and a fresh
``--user-data-dir`` so that runs never share state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_PACKAGES = ("chromium",)
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)

# Why chromium could not be had; set by find_or_install_chromium for the skip message.
last_failure_reason: str = ""


def _find_on_path() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _works(executable: str) -> bool:
    try:
        completed = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0 and "chrom" in completed.stdout.lower()


def find_or_install_chromium(install: bool = True, timeout_s: float = 900.0) -> str | None:
    """Return the path of a working Chromium executable, installing Debian's package when allowed; else ``None``.

    Installation needs root and ``apt-get``; it can be turned off with ``install=False`` or the environment variable
    ``FRANCA_NO_BROWSER_INSTALL=1``. The reason for a ``None`` is left in :data:`last_failure_reason`.
    """
    global last_failure_reason
    found = _find_on_path()
    if found and _works(found):
        return found
    if not install or os.environ.get("FRANCA_NO_BROWSER_INSTALL") == "1":
        last_failure_reason = "chromium is not on PATH and installing it is turned off"
        return None
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        last_failure_reason = "chromium is not on PATH and apt-get is not available to install it"
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        last_failure_reason = "chromium is not on PATH and installing it with apt-get needs root"
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    commands = (
        [apt_get, "update", "-qq"],
        [apt_get, "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
    )
    for command in commands:
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
            )
        except subprocess.TimeoutExpired:
            last_failure_reason = f"'{' '.join(command)}' did not finish within {timeout_s:.0f} s"
            return None
        if completed.returncode != 0:
            tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
            last_failure_reason = f"'{' '.join(command)}' failed: {tail[0]}"
            return None
    found = _find_on_path()
    if found and _works(found):
        return found
    last_failure_reason = "apt-get installed chromium but no working chromium executable is on PATH"
    return None


def _run_headless(
    executable: str, extra_args: list[str], url: str, timeout_s: float
) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="franca-chromium-") as profile:
        command = [executable, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *extra_args, url]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"chromium exited with {completed.returncode}: {completed.stderr.strip()[-2000:]}")
    return completed


def render_dom(html_path: str | Path, executable: str | None = None, timeout_s: float = 60.0) -> str:
    """Load ``html_path`` in headless Chromium and return the serialised DOM after parsing (``--dump-dom``)."""
    executable = executable or find_or_install_chromium(install=False)
    if executable is None:
        raise RuntimeError(f"no chromium: {last_failure_reason}")
    url = Path(html_path).resolve().as_uri()
    return _run_headless(executable, ["--dump-dom"], url, timeout_s).stdout


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    width: int = 1280,
    height: int = 2400,
    executable: str | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Render ``html_path`` in headless Chromium into a ``width`` x ``height`` PNG at ``png_path`` and return it."""
    executable = executable or find_or_install_chromium(install=False)
    if executable is None:
        raise RuntimeError(f"no chromium: {last_failure_reason}")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    url = Path(html_path).resolve().as_uri()
    args = [f"--screenshot={png_path}", f"--window-size={width},{height}", "--virtual-time-budget=2000"]
    _run_headless(executable, args, url, timeout_s)
    if not png_path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {png_path}")
    return png_path


if (
    __name__ == "__main__"
):  # `python tests/browser.py`: install chromium for the tests; exit 1 if it cannot be had
    import sys

    path = find_or_install_chromium()
    print(path if path else f"chromium unavailable: {last_failure_reason}")
    sys.exit(0 if path else 1)
