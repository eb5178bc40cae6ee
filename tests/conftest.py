"""Shared test setup: a signing key and a fresh configuration per test."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_SIGNING_KEY = "5e" * 32

# Set before gae_deferred reads the environment; tests that need other values use configure().
os.environ.setdefault("GAE_DEFERRED_SIGNING_KEY", TEST_SIGNING_KEY)
os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "test-project")
# Tests flush task metrics themselves (metrics.flush()); a background flush in the middle of a
# test that counts Datastore RPCs would add its transaction to the count.
os.environ.setdefault("GAE_DEFERRED_METRICS_FLUSH_SECONDS", "3600")


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Every test starts from the environment's settings, whatever the last one configured."""
    import gae_deferred._config as config

    config.reset()
    yield
    config.reset()


@pytest.fixture
def ndb_stub():
    """An in-memory Datastore (inmemory-datastore-stub) that validates our index.yaml.

    Yields the stub client; gae_deferred is configured to use it and a context is open.
    """
    from inmemory_datastore_stub import Client

    import gae_deferred

    client = Client(project="test-project", index_yaml=str(ROOT / "index.yaml"))
    gae_deferred.configure(ndb_client=client, queue_yaml=str(ROOT / "queue.yaml"))
    with client.context():
        yield client
