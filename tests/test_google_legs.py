"""make test's Google emulator legs (tests/google_legs.py): a machine without Google's emulators
runs everything else and names what did not run, first and last."""

from __future__ import annotations

import os
import subprocess
import sys

from tests import google_legs
from tests.fixtures import ROOT

NO_JAVA = "Java not found (no `java` on PATH, $JAVA unset)"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_java_the_legs_are_named_with_what_to_install_and_nothing_fails():
    done = _run("-m", "tests.google_legs", JAVA="/nonexistent/java")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"Google emulator leg 'firestore' will not run: {NO_JAVA}")
    assert lines[-2].startswith(f"Google emulator leg 'firestore': did not run: {NO_JAVA}")
    assert lines[-1].startswith(f"Google emulator leg 'datastore': did not run: {NO_JAVA}")
    assert all("openjdk" in line for line in lines if line)
    check = _run("-m", "tests.google_legs", "--check", JAVA="/nonexistent/java")
    assert check.stdout.splitlines() == lines[:2]


def test_without_java_the_main_run_names_the_tests_of_googles_emulators():
    done = _run(
        "-m",
        "pytest",
        "-p",
        "no:randomly",
        "tests/emulators/test_google_datastore.py",
        "tests/e2e/test_dev_google_datastore.py",
        JAVA="/nonexistent/java",
    )
    assert done.returncode == 5, done.stdout  # nothing ran: every test was deselected
    assert "left out of the --datastore=builtin run" in done.stdout
    named = [line for line in done.stdout.splitlines() if "needs Google's emulators" in line]
    collected = _run(
        "-m", "pytest", "--collect-only", "-q", *google_legs.GOOGLE_ONLY[:2]
    ).stdout.splitlines()
    assert len(named) == len([line for line in collected if "::" in line]) > 5
    assert all(NO_JAVA in line for line in named)


def test_the_google_legs_leave_out_only_tests_of_datastore():
    fixtures_of_a_pure_test = {"_fresh_settings", "monkeypatch"}
    assert not google_legs.reaches_datastore(
        "tests/test_config.py::test_x", fixtures_of_a_pure_test
    )
    assert google_legs.reaches_datastore("tests/test_defer.py::test_x", {"ndb_stub"})
    assert google_legs.reaches_datastore("tests/e2e/test_e2e_tasks.py::test_x", set())
    assert google_legs.left_out("firestore", "tests/test_x.py::t", {"datastore_commits"})
    restart = "tests/e2e/test_e2e_stack.py::test_emulator_restarts_mid_run_lose_nothing"
    assert google_legs.left_out("firestore", restart, set())
    assert google_legs.left_out("datastore", restart, set()) is None
    assert restart in google_legs.DATASTORE_PATHS
