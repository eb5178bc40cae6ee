"""make test finds a Chromium for the browser tests, or stops at once with one line saying what to
install (tests/browser/chromium.py)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.browser import chromium
from tests.fixtures import ROOT


def _fake_browser(directory: pathlib.Path, name: str, works: bool = True) -> pathlib.Path:
    """An executable that answers --version like Chromium does (or fails)."""
    path = directory / name
    answer = 'echo "Chromium 999.0.1"' if works else "exit 3"
    path.write_text(f"#!/bin/sh\n{answer}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def no_browser_env(tmp_path: pathlib.Path) -> dict[str, str]:
    """A PATH with nothing on it, no Playwright download, nothing downloaded before."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "playwright").mkdir()
    return {
        "PATH": str(tmp_path / "bin"),
        "HOME": str(tmp_path),
        "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1",
        "PLAYWRIGHT_BROWSERS_PATH": str(tmp_path / "playwright"),
    }


def test_an_explicit_browser_wins(tmp_path, monkeypatch):
    fake = _fake_browser(tmp_path, "my-chrome")
    monkeypatch.setenv(chromium.ENV, str(fake))
    assert chromium.find() == str(fake)
    broken = _fake_browser(tmp_path, "broken-chrome", works=False)
    monkeypatch.setenv(chromium.ENV, str(broken))
    with pytest.raises(chromium.NoChromium, match="broken-chrome does not run"):
        chromium.find()


def test_a_browser_on_path_is_found_if_it_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(chromium.ENV, raising=False)
    _fake_browser(tmp_path, "chromium", works=False)
    found = _fake_browser(tmp_path, "google-chrome")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert chromium.find() == str(found)
    assert chromium.version(str(found)) == "Chromium 999.0.1"


def test_nothing_found_is_one_line_and_no_output(no_browser_env):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/browser/chromium.py"), "--install"],
        env=no_browser_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [f"make test: {chromium.HOW_TO_INSTALL}"]


def test_make_test_stops_before_pytest_without_a_browser(no_browser_env):
    make = shutil.which("make")
    assert make, "make is a prerequisite of this repository"
    done = subprocess.run(
        # KEEP_VENVS: the venvs are there; do not rebuild them whatever the timestamps say.
        [make, "-s", "test", "KEEP_VENVS=1"],
        cwd=ROOT,
        env=no_browser_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if not line.startswith("make:")]
    assert ours == [f"make test: {chromium.HOW_TO_INSTALL}"]
    assert "passed" not in done.stdout and "collected" not in done.stdout
