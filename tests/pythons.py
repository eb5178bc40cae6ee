"""`make test` on every supported Python: the whole suite on the first, a part on the others.

The whole run goes on with the suites on Google's emulators (tests/google_legs.py).

    python3 tests/pythons.py                    # make test: 3.11 whole, 3.12 and 3.13 in part
    python3 tests/pythons.py --only python3.13  # make test PYTHON=python3.13: that one, whole

Each Python gets its own venv (``.venv`` for 3.11, ``.venv-3.12``...), built by ``make venv``
with the same recipe. An interpreter is found on PATH (``python3.12``; a pyenv shim that is not
active does not count) or under ``$PYENV_ROOT/versions`` (default ``~/.pyenv``). A version that
is not on this machine is not a silent gap: one line names it when it is found missing and
again at the end, with how to get it; the others still run. Standard library only, so any
``python3`` can run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The Python the whole suite runs on, and the others that repeat part of it.
PRIMARY = "3.11"
OTHERS = ("3.12", "3.13")
#: What 3.12 and 3.13 repeat: everything but the browser suite, the slow (load) runs and the
#: fault injection, which drive Chromium, load and process kills against the same server code
#: the end-to-end and install suites already start under each Python (README, "Python
#: versions").
PART = "not browser and not slow"
PART_IGNORES = ("tests/reliability/test_faults.py",)
SUPPORTED = (PRIMARY, *OTHERS)
#: Runs envelopes between this Python and the others' venvs.
CROSS_TEST = "tests/test_cross_python.py"


@dataclasses.dataclass
class Run:
    version: str
    python: str | None
    whole: bool
    outcome: str = "not run"


def _reported_version(command: str) -> str | None:
    """``major.minor`` of the interpreter ``command``, or None when it does not run."""
    try:
        done = subprocess.run(
            [command, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def find_python(version: str, path: str | None = None, pyenv_root: str | None = None) -> str | None:
    """An interpreter of ``version`` (e.g. "3.12"): its venv's (unless ``path`` is given),
    ``pythonX.Y`` on PATH, else pyenv's."""
    made = os.path.join(ROOT, venv_dir(version), "bin", "python")
    if path is None and os.path.exists(made) and _reported_version(made) == version:
        return made
    on_path = shutil.which(f"python{version}", path=path)
    if on_path and _reported_version(on_path) == version:
        return on_path
    root = pyenv_root or os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}"))
    for candidate in sorted(found, key=_release, reverse=True):
        if _reported_version(candidate) == version:
            return candidate
    return None


def _release(path: str) -> tuple[int, ...]:
    name = os.path.basename(os.path.dirname(os.path.dirname(path)))
    return tuple(int(part) if part.isdigit() else -1 for part in name.split("."))


def how_to_get(version: str) -> str:
    """The one line that names a Python that did not run."""
    return (
        f"Python {version} did not run: no python{version} on PATH or in ~/.pyenv/versions; "
        f"install it (`pyenv install {version}`, or your system's python{version} package) "
        "and run make test again"
    )


def venv_dir(version: str) -> str:
    return ".venv" if version == PRIMARY else f".venv-{version}"


def _venv_python(version: str) -> str:
    return os.path.join(ROOT, venv_dir(version), "bin", "python")


def _venvs() -> list[str]:
    """The supported versions whose venv is built."""
    return [version for version in SUPPORTED if os.path.exists(_venv_python(version))]


def plan(only: str | None) -> list[Run]:
    """What to run: ``only`` (a command or path) whole, else every supported version."""
    if only:
        python: str | None = shutil.which(only) or only
        version = _reported_version(python)
        named = re.fullmatch(r"python(3\.\d+)", os.path.basename(only))
        if version is None and named:
            # python3.13 on PATH may be a pyenv shim of a version that is not active.
            version, python = named.group(1), find_python(named.group(1))
        if python is None or _reported_version(python) is None:
            raise SystemExit(f"make test: PYTHON={only} does not run")
        return [Run(version, python, whole=True)]
    runs = [Run(PRIMARY, find_python(PRIMARY), whole=True)]
    runs += [Run(version, find_python(version), whole=False) for version in OTHERS]
    return runs


def _say(text: str) -> None:
    print(f"make test: {text}", flush=True)


def build_venv(run: Run, make: str = "make") -> None:
    """The version's venv, by ``make venv`` (a no-op when it is up to date)."""
    venv = venv_dir(run.version)
    subprocess.run(
        [make, "-s", "venv", f"PYTHON={run.python}", f"VENV={venv}"], cwd=ROOT, check=True
    )


def check_google_legs(python: str) -> None:
    """Name the Google emulator legs this machine cannot run, before the tests (and after)."""
    subprocess.run([python, "-m", "tests.google_legs", "--check"], cwd=ROOT)


def run_suite(run: Run, extra: list[str]) -> int:
    """Run the version's tests in its venv; pytest's exit status."""
    venv = venv_dir(run.version)
    python = os.path.join(ROOT, venv, "bin", "python")
    env = dict(os.environ)
    command = [python, "-m", "pytest", *extra]
    if run.whole:
        chromium = subprocess.run(
            [python, "tests/browser/chromium.py", "--install"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        if chromium.returncode != 0:
            raise SystemExit(chromium.returncode)
        env["GAE_DEFERRED_CHROMIUM"] = chromium.stdout.strip()
        _say(f"Python {run.version}: every test; browser tests: {env['GAE_DEFERRED_CHROMIUM']}")
    else:
        command += ["-m", PART, *(f"--ignore={path}" for path in PART_IGNORES)]
        _say(f"Python {run.version}: {_part()}")
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    if not run.whole:
        return code
    # The whole run goes on with the Google emulator legs, also when it failed.
    google = subprocess.run([python, "-m", "tests.google_legs", *extra], cwd=ROOT, env=env)
    return code or google.returncode


def _part() -> str:
    return f"-m '{PART}', without {', '.join(PART_IGNORES)}"


def summary(runs: list[Run]) -> list[str]:
    """The closing lines: one per version, and the how-to-get line of each that did not run."""
    lines = []
    for run in runs:
        if run.python is None:
            lines.append(how_to_get(run.version))
        else:
            scope = "every test" if run.whole else _part()
            lines.append(f"Python {run.version} ({scope}): {run.outcome}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="one interpreter (command or path): every test on it")
    parser.add_argument("--make", default="make", help="the make that runs this (its $(MAKE))")
    parser.add_argument(
        "--keep-venvs", action="store_true", help="use existing venvs as they are, never rebuild"
    )
    options, extra = parser.parse_known_args(argv)
    runs = plan(options.only)
    for run in runs:
        if run.python is None:
            _say(how_to_get(run.version))
    found = [run for run in runs if run.python is not None]
    # Every venv first: the cross-Python test of each run uses the others'.
    for run in found:
        if not (options.keep_venvs and os.path.exists(_venv_python(run.version))):
            build_venv(run, options.make)
    if len(found) < 2 and len(_venvs()) < 2:
        extra = [*extra, f"--ignore={CROSS_TEST}"]
        _say(f"{CROSS_TEST} did not run: it needs two of Python {', '.join(SUPPORTED)}")
    whole = [run for run in found if run.whole]
    if whole:
        check_google_legs(_venv_python(whole[0].version))
    status = 0
    for run in found:
        code = run_suite(run, extra)
        run.outcome = "passed" if code == 0 else f"FAILED (pytest exit status {code})"
        status = status or code
    for line in summary(runs):
        _say(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
