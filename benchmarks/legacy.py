"""The separate interpreter for the legacy handler: ``.venv-bench-legacy``.

appengine-python-standard pins urllib3 < 2 (and brings grpcio-tools, mock, ...), which would
downgrade packages in the project's ``.venv``; so it lives in its own venv, created on first
use from ``requirements-bench.txt`` (PyPI needed once), and the measurement runs there as a
subprocess of the same ``make bench``::

    python = legacy_python(install=True)     # path, or None if not installed and not allowed
    data = run_legacy(python, rounds=21, inner=100)
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from ._setup import ROOT

VENV = ROOT / ".venv-bench-legacy"
REQUIREMENTS = ROOT / "requirements-bench.txt"
_STAMP = VENV / ".installed"


def legacy_python(*, install: bool) -> pathlib.Path | None:
    """The legacy venv's python, creating the venv when ``install`` and it is missing/stale."""
    python = VENV / "bin" / "python"
    fresh = _STAMP.exists() and _STAMP.stat().st_mtime >= REQUIREMENTS.stat().st_mtime
    if python.exists() and fresh:
        return python
    if not install:
        return None
    print(f"creating {VENV.name} from {REQUIREMENTS.name} (once)...", file=sys.stderr)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-r",
            str(REQUIREMENTS),
        ],
        check=True,
    )
    _STAMP.touch()
    return python


def run_legacy(python: pathlib.Path, *, rounds: int, inner: int) -> dict:
    """Run benchmarks.legacy_handler in the legacy interpreter; its JSON result."""
    completed = subprocess.run(
        [
            str(python),
            "-m",
            "benchmarks.legacy_handler",
            "--rounds",
            str(rounds),
            "--inner",
            str(inner),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"legacy handler benchmark failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
