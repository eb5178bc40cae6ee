"""tests/pythons.py, what `make test` runs: each supported Python found, a missing one named."""

from __future__ import annotations

import pathlib
import sys

import pytest

from tests import pythons

PART = "-m 'not browser and not slow', without tests/reliability/test_faults.py"


def _interpreter(path: pathlib.Path, version: str | None) -> pathlib.Path:
    """A stand-in interpreter that reports ``version``, or fails like an inactive pyenv shim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if version is None:
        path.write_text("#!/bin/sh\necho 'pyenv: python3.12: command not found' >&2\nexit 127\n")
    else:
        path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def test_an_inactive_pyenv_shim_does_not_count_but_pyenvs_own_interpreter_does(tmp_path):
    shims = tmp_path / "shims"
    _interpreter(shims / "python3.12", None)
    root = tmp_path / "pyenv"
    _interpreter(root / "versions/3.12.1/bin/python3.12", "3.12")
    newest = _interpreter(root / "versions/3.12.10/bin/python3.12", "3.12")
    assert pythons.find_python("3.12", path=str(shims), pyenv_root=str(root)) == str(newest)
    assert pythons.find_python("3.13", path=str(shims), pyenv_root=str(root)) is None


def test_a_python_on_path_that_reports_its_version_is_taken(tmp_path):
    found = _interpreter(tmp_path / "bin/python3.13", "3.13")
    _interpreter(tmp_path / "bin/python3.12", "3.11")  # a wrong link: not 3.12
    assert pythons.find_python("3.13", path=str(found.parent), pyenv_root=str(tmp_path)) == str(
        found
    )
    assert pythons.find_python("3.12", path=str(found.parent), pyenv_root=str(tmp_path)) is None


def test_a_missing_python_is_named_in_one_line_first_and_last_and_the_others_run(
    monkeypatch, capsys
):
    ran = []
    monkeypatch.setattr(
        pythons, "find_python", lambda version: None if version == "3.13" else f"/py{version}"
    )
    monkeypatch.setattr(pythons, "build_venv", lambda run, make: None)
    monkeypatch.setattr(pythons, "check_google_legs", lambda python: None)
    monkeypatch.setattr(
        pythons, "run_suite", lambda run, extra: ran.append((run.version, run.whole)) or 0
    )
    assert pythons.main(["-x"]) == 0
    assert ran == [("3.11", True), ("3.12", False)]
    lines = capsys.readouterr().out.splitlines()
    missing = f"make test: {pythons.how_to_get('3.13')}"
    assert lines[0] == missing and lines[-1] == missing
    assert "pyenv install 3.13" in missing
    assert lines[-3:-1] == [
        "make test: Python 3.11 (every test): passed",
        f"make test: Python 3.12 ({PART}): passed",
    ]


def test_a_failed_run_fails_make_test_and_says_which(monkeypatch, capsys):
    monkeypatch.setattr(pythons, "find_python", lambda version: f"/py{version}")
    monkeypatch.setattr(pythons, "build_venv", lambda run, make: None)
    monkeypatch.setattr(pythons, "check_google_legs", lambda python: None)
    monkeypatch.setattr(pythons, "run_suite", lambda run, extra: 1 if run.version == "3.12" else 0)
    assert pythons.main([]) == 1
    out = capsys.readouterr().out
    assert f"Python 3.12 ({PART}): FAILED (pytest exit status 1)" in out
    assert f"Python 3.13 ({PART}): passed" in out


def test_only_runs_that_one_python_whole():
    (run,) = pythons.plan(sys.executable)
    assert (run.version, run.whole) == (f"{sys.version_info.major}.{sys.version_info.minor}", True)
    with pytest.raises(SystemExit, match="PYTHON=no-such-python does not run"):
        pythons.plan("no-such-python")


def test_with_one_python_the_cross_python_test_is_left_out_and_named(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(
        pythons, "find_python", lambda version: "/py3.11" if version == "3.11" else None
    )
    monkeypatch.setattr(pythons, "build_venv", lambda run, make: None)
    monkeypatch.setattr(pythons, "check_google_legs", lambda python: None)
    monkeypatch.setattr(pythons, "run_suite", lambda run, extra: ran.append(extra) or 0)
    monkeypatch.setattr(pythons, "_venvs", lambda: ["3.11"])
    assert pythons.main([]) == 0
    assert ran == [["--ignore=tests/test_cross_python.py"]]
    out = capsys.readouterr().out
    assert "tests/test_cross_python.py did not run: it needs two of Python 3.11, 3.12, 3.13" in out


def test_python3_13_names_a_version_even_where_its_command_is_an_inactive_shim(
    tmp_path, monkeypatch
):
    _interpreter(tmp_path / "shims/python3.13", None)
    real = _interpreter(tmp_path / "pyenv/versions/3.13.0/bin/python3.13", "3.13")
    monkeypatch.setenv("PATH", str(tmp_path / "shims"))
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    monkeypatch.setattr(pythons, "ROOT", str(tmp_path))  # no venv of its own yet
    (run,) = pythons.plan("python3.13")
    assert (run.version, run.python, run.whole) == ("3.13", str(real), True)
