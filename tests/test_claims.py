"""Duplicate deliveries while the first still runs: a claim taken before the call.

Two deliveries of the same task (same body, same task name) reach the real handler at once,
on the Datastore emulator (transactions conflict per entity, as on Datastore). The first
blocks inside the deferred function until the second has been answered: spilled and
@idempotent tasks run once (the second is answered 503 "claimed" and retried by Cloud Tasks
later, when it is a no-op); an inline task without @idempotent runs twice — at-least-once, as
docs/reliability.md says.
"""

from __future__ import annotations

import os
import threading

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import envelope, idempotent, spillover
from gae_deferred.webapp2 import deferred_routes

RUNS: list[str] = []
_inside = threading.Event()
_go_on = threading.Event()


@pytest.fixture(autouse=True)
def _fresh() -> None:
    RUNS.clear()
    _inside.clear()
    _go_on.clear()


def _blocking(label: str) -> None:
    """The first run waits until the test lets it finish; a second run (if any) does not."""
    RUNS.append(label)
    if _inside.is_set():
        return
    _inside.set()
    assert _go_on.wait(20), "the test never let the first delivery finish"


def plain(label: str, payload: bytes = b"") -> None:
    _blocking(label)


@idempotent
def once(label: str) -> None:
    _blocking(label)


@idempotent(transactional=True)
def once_in_transaction(label: str) -> None:
    _blocking(label)


def _deliver(body: bytes, name: str, retry: int = 0) -> webtest.TestResponse:
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    headers = {
        "X-AppEngine-QueueName": "default",
        "X-AppEngine-TaskName": name,
        "X-AppEngine-TaskRetryCount": str(retry),
    }
    return app.post("/_ah/queue/deferred", body, headers=headers, expect_errors=True)


def _twice_at_once(body: bytes, name: str) -> tuple[int, int]:
    """Deliver ``body`` as task ``name``; while that first delivery runs, deliver it again.
    Returns both statuses (first, second)."""
    first: list[int] = []
    thread = threading.Thread(target=lambda: first.append(_deliver(body, name).status_int))
    thread.start()
    try:
        assert _inside.wait(20), "the first delivery never started"
        second = _deliver(body, name).status_int
    finally:
        _go_on.set()
        thread.join()
    return first[0], second


def _spilled_body(tasks, function, *args) -> tuple[bytes, str]:
    """Defer a spilled call into the paused queue; its task's body and name."""
    task = gae_deferred.defer(function, *args, os.urandom(200_000))
    assert task.spilled
    (queued,) = tasks()
    return queued.app_engine_http_request.body, task.name


@pytest.mark.parametrize("function", [once, once_in_transaction], ids=["idempotent", "tx"])
def test_idempotent_duplicate_while_the_first_runs_is_claimed_not_run(ndb_emulator, function):
    body = envelope.build(function, ("x",), task="dup-1", queue="default")
    assert _twice_at_once(body, "dup-1") == (200, 503)
    assert RUNS == ["x"]
    # Cloud Tasks retries the claimed delivery later: the key is done, a no-op.
    assert _deliver(body, "dup-1", retry=1).status_int == 200
    assert RUNS == ["x"]


def test_spilled_duplicate_while_the_first_runs_is_claimed_not_run(paused_on_emulator):
    body, name = _spilled_body(paused_on_emulator, plain, "spilled")
    assert _twice_at_once(body, name) == (200, 503)
    assert RUNS == ["spilled"]
    response = _deliver(body, name, retry=1)
    assert response.status_int == 200 and b"duplicate" in response.body
    assert RUNS == ["spilled"]


def test_inline_task_without_idempotent_is_at_least_once(ndb_emulator):
    """What the docs promise for a plain inline task: it may run twice."""
    body = envelope.build(plain, ("inline",), task="dup-3", queue="default")
    assert _twice_at_once(body, "dup-3") == (200, 200)
    assert RUNS == ["inline", "inline"]


def test_a_failed_run_gives_its_claim_up(ndb_emulator):
    """The claim must not hold back the retry of an attempt that failed."""
    body = envelope.build(fails_once, ("f",), task="dup-4", queue="default")
    assert _deliver(body, "dup-4").status_int == 500
    assert _deliver(body, "dup-4", retry=1).status_int == 200
    assert RUNS == ["f-failed", "f"]


def test_a_failed_spilled_run_gives_its_claim_up(paused_on_emulator):
    body, name = _spilled_body(paused_on_emulator, fails_once_spilled, "s")
    assert _deliver(body, name).status_int == 500
    (record,) = spillover.DeferredPayload.query().fetch()
    assert record.claim is None and record.state == "retrying"
    assert _deliver(body, name, retry=1).status_int == 200
    assert RUNS == ["s-failed", "s"]


@idempotent
def fails_once(label: str) -> None:
    if gae_deferred.task_retry_count() == 0:
        RUNS.append(f"{label}-failed")
        raise RuntimeError("first attempt fails")
    RUNS.append(label)


def fails_once_spilled(label: str, payload: bytes) -> None:
    if gae_deferred.task_retry_count() == 0:
        RUNS.append(f"{label}-failed")
        raise RuntimeError("first attempt fails")
    RUNS.append(label)


def test_a_crashed_runs_claim_does_not_hold_back_the_task_that_replaced_it(paused_on_emulator):
    """A run killed mid-task keeps its claim until the lease ends; the payload retriggered (or
    re-created by the sweeper) under another task name runs at once all the same, while a
    redelivery of the crashed task itself waits."""
    body, name = _spilled_body(paused_on_emulator, plain, "moved")
    (record,) = spillover.DeferredPayload.query().fetch()
    payload_id = record.key.id()
    spillover.claim(payload_id, name, "crashed-run")
    assert _deliver(body, name, retry=1).status_int == 503
    record = spillover.get(payload_id)
    gae_deferred.enqueue.enqueue_record(record, name="moved-1")
    record.put()
    (moved,) = [t for t in paused_on_emulator() if t.name.endswith("/tasks/moved-1")]
    _go_on.set()
    response = _deliver(moved.app_engine_http_request.body, "moved-1")
    assert response.status_int == 200
    assert RUNS == ["moved"]
