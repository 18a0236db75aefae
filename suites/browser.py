"""Render an HTML report in headless Chromium: a screenshot, and the page's console errors.

Used by the tests (the report must load without a single console message) and to make
`docs/report-screenshot.png`. Chromium is an optional tool, not a dependency:
`find_chromium()` returns None when it is not installed (Debian: `apt-get install chromium`).

Console messages are read from Chromium's own log (`--enable-logging=stderr`), where every
`console.*` call, uncaught exception and refused resource (the report's
Content-Security-Policy forbids loading anything) of the page appears as a line
`…:INFO:CONSOLE…] "message", source: file:///… (line)`. The report has no scripts, so any
such line is an error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# Flags that keep a headless run quiet, offline and reproducible.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--enable-logging=stderr",
    "--v=0",
)

# Chromium's log line for a console message, old (`CONSOLE(12)`) and new (`CONSOLE:12`) style.
_CONSOLE = re.compile(r"(?:INFO|WARNING|ERROR|VERBOSE\d*):CONSOLE[(:]")


def find_chromium() -> str | None:
    """The path of a Chromium or Chrome executable on PATH, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def console_errors(log: str) -> list[str]:
    """The lines of a Chromium log that report console messages or uncaught exceptions."""
    return [
        line.strip() for line in log.splitlines() if _CONSOLE.search(line) or "Uncaught" in line
    ]


def screenshot_html(
    html_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    chromium: str | None = None,
    *,
    window_size: tuple[int, int] = (1280, 1600),
    timeout: float = 60.0,
) -> list[str]:
    """Load `html_path` in headless Chromium, write a screenshot to `png_path`.

    Returns the console lines the page produced (empty for a clean page). Raises
    FileNotFoundError when no Chromium is found and RuntimeError when it writes no screenshot.
    """
    executable = chromium or find_chromium()
    if executable is None:
        raise FileNotFoundError(
            "no Chromium found on PATH; install it, e.g. apt-get install chromium"
        )
    url = Path(html_path).resolve().as_uri()
    png = Path(png_path).resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="bastion-chromium-") as profile:
        command = [
            executable,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={window_size[0]},{window_size[1]}",
            f"--screenshot={png}",
            url,
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
        )
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(
            f"Chromium wrote no screenshot (exit code {done.returncode}): {done.stderr[-2000:]}"
        )
    return console_errors(done.stdout + "\n" + done.stderr)
