"""A Datastore emulator in a process of its own, for the tests that walk 10,000 entities: in
the test's process, the emulator and the client would share one interpreter lock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import stack_support
from tests.fixtures import ROOT


@pytest.fixture
def ndb_emulator_process(request, monkeypatch):
    """Like ``ndb_emulator``, with the emulator (index.yaml's rules) as a child process; on a
    Google emulator leg (``--datastore``), that leg's emulator, as ``ndb_emulator`` gives it."""
    from google.cloud import ndb

    import gae_deferred

    if stack_support.DATASTORE != "builtin":
        yield request.getfixturevalue("ndb_emulator")
        return
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gae_deferred.local.datastore",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--index-yaml",
            str(ROOT / "index.yaml"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert "listening on" in line, line
        address = line.rsplit(" ", 1)[-1].strip()
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", address)
        client = ndb.Client(project="test-project")
        gae_deferred.configure(ndb_client=client, queue_yaml=str(ROOT / "queue.yaml"))
        with client.context(cache_policy=False, global_cache_policy=False):
            yield client
    finally:
        child.terminate()
        child.wait(timeout=30)
