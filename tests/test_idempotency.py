"""@idempotent: work that must not repeat runs once per task (or per key), however often the
task is delivered."""

from __future__ import annotations

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import envelope, idempotent
from gae_deferred.webapp2 import deferred_routes

CALLS: list = []


@pytest.fixture(autouse=True)
def _fresh_calls():
    CALLS.clear()


@idempotent
def charge(amount):
    CALLS.append(amount)
    return amount


@idempotent(key=lambda order_id: order_id, transactional=True)
def ship(order_id):
    CALLS.append(order_id)


def test_idempotent_runs_once_per_task(ndb_stub):
    task = gae_deferred.TaskInfo(name="t1", queue="default")
    with gae_deferred.context.running(task):
        assert charge(5) == 5
        assert charge(5) is None
    with gae_deferred.context.running(gae_deferred.TaskInfo(name="t2", queue="default")):
        charge(6)
    assert CALLS == [5, 6]


def test_idempotent_outside_a_task_just_runs(ndb_stub):
    charge(1)
    charge(1)
    assert CALLS == [1, 1]


def test_idempotent_with_a_key_in_a_transaction(ndb_stub):
    ship("o-1")
    ship("o-1")
    ship("o-2")
    assert CALLS == ["o-1", "o-2"]


@pytest.mark.parametrize("attempts", [2, 5])
def test_task_delivered_twice_runs_once(ndb_stub, attempts):
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    data = envelope.build(charge, (9,), task="dup", queue="default")
    headers = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "dup"}
    for _ in range(attempts):
        app.post("/_ah/queue/deferred", data, headers=headers, status=200)
    assert CALLS == [9]


@idempotent(key=lambda key: key)
def remember(key):
    CALLS.append(key)


@pytest.fixture
def on_google_datastore(firestore_emulator, monkeypatch):
    """ndb on Google's Firestore emulator (Datastore mode), which refuses key names over 1,500
    bytes as production does."""
    from google.cloud import ndb

    firestore_emulator.reset()
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", firestore_emulator.address)
    client = ndb.Client(project="test-project")
    gae_deferred.configure(ndb_client=client)
    with client.context(cache_policy=False, global_cache_policy=False):
        yield client


@pytest.mark.parametrize(
    "key",
    ["k" * 1_600, "é" * 1_000, "x" * 1_600 + "y", "o-1"],
)
def test_idempotency_key_of_any_length_runs_once(on_google_datastore, key):
    """Keys that would make a marker name over Datastore's 1,500 bytes are hashed: the
    function runs, once per key."""
    remember(key)
    remember(key)
    other = key + "!"
    remember(other)
    assert [key, other] == CALLS
