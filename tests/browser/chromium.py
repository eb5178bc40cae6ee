"""Find (or get) the Chromium the browser tests drive; ``make test`` runs this before pytest.

    python tests/browser/chromium.py --install   # prints the browser's path, or one error line

In order: ``GAE_DEFERRED_CHROMIUM`` if set; a Chrome or Chromium on ``PATH`` (chromium,
chromium-browser, google-chrome, ...); a browser Playwright already downloaded; with
``--install``, ``playwright install chromium`` (unless ``PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD`` is
set), then, as root on Debian, ``apt-get install chromium``. A candidate counts only if
``<path> --version`` runs. The browser conftest uses the path ``make test`` exports as
``GAE_DEFERRED_CHROMIUM`` (or calls :func:`find` without installing).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ENV = "GAE_DEFERRED_CHROMIUM"
NAMES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chrome",
)
MAC_APPS = (
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
)
HOW_TO_INSTALL = (
    "the browser tests need Chromium and none was found or could be installed: install it "
    "(Debian/Ubuntu: sudo apt-get install chromium; macOS: brew install --cask chromium), or "
    "run `.venv/bin/python -m playwright install chromium`, or set GAE_DEFERRED_CHROMIUM to a "
    "Chrome/Chromium binary"
)


class NoChromium(RuntimeError):
    """No usable browser; the message says what to install, in one line."""


def version(path: str) -> str | None:
    """``<path> --version`` (e.g. "Chromium 120.0.6099.224"), or None if it does not run."""
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def _on_path() -> str | None:
    candidates = [shutil.which(name) for name in NAMES]
    if sys.platform == "darwin":
        candidates += list(MAC_APPS)
    return next((c for c in candidates if c and version(c)), None)


def _playwright_download() -> str | None:
    """The Chromium Playwright downloaded (``playwright install chromium``), if any."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        path = playwright.chromium.executable_path
    return path if path and pathlib.Path(path).is_file() and version(path) else None


def _run(argv: list[str], env: dict[str, str] | None = None) -> bool:
    """Run an installer, its output on stderr (stdout carries only the path); True if it worked."""
    print(f"chromium: {' '.join(argv)}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(argv, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
    except OSError:
        return False
    return done.returncode == 0


def _install_with_playwright() -> str | None:
    if os.environ.get("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"):
        return None
    if not _run([sys.executable, "-m", "playwright", "install", "chromium"]):
        return None
    return _playwright_download()


def _install_with_apt() -> str | None:
    apt_get = shutil.which("apt-get")
    if apt_get is None or os.geteuid() != 0 or not pathlib.Path("/etc/debian_version").exists():
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt_get, "install", "-y", "--no-install-recommends", "chromium"]
    if not (_run([apt_get, "update"], env) and _run(install, env)):
        return None
    return _on_path()


def find(install: bool = False) -> str:
    """The path of a Chromium that runs; raises NoChromium (one line) when there is none."""
    given = os.environ.get(ENV)
    if given:
        if version(given):
            return given
        raise NoChromium(f"{ENV}={given} does not run (`{given} --version` failed)")
    found = _on_path() or _playwright_download()
    if found is None and install:
        found = _install_with_playwright() or _install_with_apt()
    if found is None:
        raise NoChromium(HOW_TO_INSTALL)
    return found


def main(argv: list[str]) -> int:
    try:
        print(find(install="--install" in argv))
    except NoChromium as exc:
        print(f"make test: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
