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
