"""Envelopes made under one Python and run under another, with the real interpreters.

The other side runs in the venv `make test` builds for it (.venv, .venv-3.12, .venv-3.13;
tests/pythons.py, which leaves this file out, naming the gap, when this machine has only one of
them). Module functions, bound methods of importable classes, builtins and partials run both
ways; code pickled by value (lambdas, closures, local classes) is refused before it is unpickled
as a VersionSkewError naming both runtimes, and kept: unguarded, CPython ran such bytecode as it
was and crashed (segfaults measured 3.11 -> 3.12 and 3.11 <-> 3.13). docs/migration.md has the
table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import webapp2
import webtest

from gae_deferred import FailureState, envelope, failures
from gae_deferred.webapp2 import deferred_routes
from tests import cross_python, pythons
from tests.fixtures import ROOT

MINE = f"{sys.version_info.major}.{sys.version_info.minor}"
PARTNERS = [
    (version, str(ROOT / pythons.venv_dir(version) / "bin" / "python"))
    for version in (pythons.PRIMARY, *pythons.OTHERS)
    if version != MINE and (ROOT / pythons.venv_dir(version) / "bin" / "python").exists()
]
BY_REFERENCE = {
    "module function",
    "bound method",
    "classmethod",
    "staticmethod",
    "builtin",
    "functools.partial",
}
BY_VALUE = {"lambda", "closure", "local class method"}


def _other(python: str, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [python, "-m", "tests.cross_python", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(params=PARTNERS or [None], ids=lambda partner: partner and partner[0])
def partner(request):
    if request.param is None:
        found = [version for version in pythons.OTHERS if pythons.find_python(version)]
        pytest.fail(
            "no venv of another supported Python to run envelopes with: `make test` builds "
            + (
                f"them (this machine has Python {', '.join(found)})"
                if found
                else f"them; {pythons.how_to_get(pythons.OTHERS[-1])}"
            )
        )
    return request.param


def test_the_kinds_cover_by_reference_and_by_value():
    assert set(cross_python.kinds()) == BY_REFERENCE | BY_VALUE


def test_envelopes_made_there_run_here_or_fail_as_version_skew(partner):
    version, python = partner
    made = json.loads(_other(python, "make"))
    assert made["python"].startswith(version + ".")
    outcome = cross_python.run(made["envelopes"])
    assert {name for name, result in outcome.items() if result == "ran"} == BY_REFERENCE
    for name in BY_VALUE:
        assert outcome[name].startswith("VersionSkewError: version skew:"), outcome[name]
        assert f"Python {made['python']}" in outcome[name]
        assert f"Python {envelope.PYTHON_VERSION}" in outcome[name]


def test_envelopes_made_here_run_there_or_fail_as_version_skew(partner):
    _, python = partner
    mine = json.dumps({"python": envelope.PYTHON_VERSION, "envelopes": cross_python.make()})
    outcome = json.loads(_other(python, "run", stdin=mine))
    assert {name for name, result in outcome.items() if result == "ran"} == BY_REFERENCE
    for name in BY_VALUE:
        assert outcome[name].startswith("VersionSkewError: version skew:"), outcome[name]
        assert f"Python {envelope.PYTHON_VERSION}" in outcome[name]


def test_a_lambda_from_another_python_is_a_kept_version_skew_failure(partner, ndb_stub):
    version, python = partner
    made = json.loads(_other(python, "make"))
    body = bytes.fromhex(made["envelopes"]["lambda"])
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    task = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "from-" + version}
    answer = app.post("/_ah/queue/deferred", body, headers=task)
    assert answer.status_int == 200  # not retried: it cannot load here
    record = failures.get(failures.failure_id("default", "from-" + version))
    assert record.state == FailureState.DEAD
    assert record.exception_type == "gae_deferred.errors.VersionSkewError"
    assert made["python"] in record.message and envelope.PYTHON_VERSION in record.message
    assert failures.get_payload(record.key.id()) == body
