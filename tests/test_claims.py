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
import time

import pytest
import webapp2
import webtest
from google.api_core import exceptions as api_exceptions

import gae_deferred
from gae_deferred import _datastore, envelope, execution, idempotency, idempotent, spillover
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


def _claim_of(name: str) -> str | None:
    (record,) = spillover.DeferredPayload.query().fetch()
    assert record.task_name == name
    return record.claim


def test_an_attempt_that_datastore_fails_after_its_claim_gives_the_claim_up(
    paused_on_emulator, monkeypatch
):
    """Datastore fails the attempt after the claim landed (reading the payload, then writing
    the failure record): the claim is given up, so the redelivery runs now, not after the
    claim's lease (task_deadline_seconds)."""
    body, name = _spilled_body(paused_on_emulator, plain, "after-outage")
    real_load = spillover.load

    def unavailable(*args, **kwargs):
        raise api_exceptions.ServiceUnavailable("Datastore restarting")

    monkeypatch.setattr(spillover, "load", unavailable)
    monkeypatch.setattr(execution._ndb_rpc, "commit", unavailable)  # the failure record too
    assert _deliver(body, name).status_int == 500
    monkeypatch.undo()
    assert spillover.load is real_load
    assert _claim_of(name) is None
    _go_on.set()
    assert _deliver(body, name, retry=1).status_int == 200
    assert RUNS == ["after-outage"]


def test_a_claim_whose_commit_reply_was_lost_is_given_up(paused_on_emulator, monkeypatch):
    """The claim's transaction committed but its caller saw an error: the attempt gives up
    the claim it may hold (by its token), and the redelivery runs now."""
    body, name = _spilled_body(paused_on_emulator, plain, "lost-reply")
    real_claim = spillover.claim

    def landed_unanswered(*args, **kwargs):
        real_claim(*args, **kwargs)
        raise api_exceptions.ServiceUnavailable("connection reset after the commit")

    monkeypatch.setattr(spillover, "claim", landed_unanswered)
    assert _deliver(body, name).status_int == 500
    monkeypatch.undo()
    assert _claim_of(name) is None
    _go_on.set()
    assert _deliver(body, name, retry=1).status_int == 200
    assert RUNS == ["lost-reply"]


def test_giving_a_claim_up_retries_while_datastore_comes_back(paused_on_emulator, monkeypatch):
    body, name = _spilled_body(paused_on_emulator, plain, "comes-back")
    real_release = spillover.release
    release_calls: list[float] = []

    def down_twice(*args, **kwargs):
        release_calls.append(time.monotonic())
        if len(release_calls) <= 2:
            raise api_exceptions.ServiceUnavailable("Datastore restarting")
        real_release(*args, **kwargs)

    def unavailable(*args, **kwargs):
        raise api_exceptions.ServiceUnavailable("Datastore restarting")

    monkeypatch.setattr(spillover, "release", down_twice)
    monkeypatch.setattr(spillover, "load", unavailable)
    monkeypatch.setattr(execution._ndb_rpc, "commit", unavailable)
    assert _deliver(body, name).status_int == 500
    monkeypatch.undo()
    assert len(release_calls) == 3
    assert release_calls[2] - release_calls[0] >= 1.4  # waited 0.5 s, then 1 s
    assert _claim_of(name) is None


def test_a_claim_datastore_never_lets_go_of_holds_until_its_lease_ends(
    paused_on_emulator, monkeypatch
):
    """Past CLAIM_RELEASE_SECONDS the attempt stops trying; the claim holds redeliveries off
    (503 claimed) until its lease ends, as for a run killed mid-task."""
    body, name = _spilled_body(paused_on_emulator, plain, "never")

    def unavailable(*args, **kwargs):
        raise api_exceptions.ServiceUnavailable("Datastore down")

    monkeypatch.setattr(_datastore, "CLAIM_RELEASE_SECONDS", 0.2)
    monkeypatch.setattr(spillover, "release", unavailable)
    monkeypatch.setattr(spillover, "load", unavailable)
    monkeypatch.setattr(execution._ndb_rpc, "commit", unavailable)
    started = time.monotonic()
    assert _deliver(body, name).status_int == 500
    assert time.monotonic() - started < 5
    monkeypatch.undo()
    assert _claim_of(name) is not None
    assert _deliver(body, name, retry=1).status_int == 503
    assert RUNS == []


def test_an_idempotent_claim_whose_commit_reply_was_lost_is_given_up(ndb_emulator, monkeypatch):
    body = envelope.build(once, ("idem-lost",), task="dup-lost", queue="default")
    real_claim = idempotency._claim

    def landed_unanswered(*args, **kwargs):
        real_claim(*args, **kwargs)
        raise api_exceptions.ServiceUnavailable("connection reset after the commit")

    monkeypatch.setattr(idempotency, "_claim", landed_unanswered)
    assert _deliver(body, "dup-lost").status_int == 500
    monkeypatch.undo()
    _go_on.set()
    assert _deliver(body, "dup-lost", retry=1).status_int == 200
    assert RUNS == ["idem-lost"]


@idempotent
def raises_its_own(label: str) -> None:
    RUNS.append(label)
    raise KeyError(label)


def test_an_idempotent_call_that_raises_while_datastore_is_down_raises_its_own_error(
    ndb_emulator, monkeypatch
):
    """Giving the claim up fails (Datastore down past CLAIM_RELEASE_SECONDS): the caller sees
    the function's own exception, not Datastore's."""

    def unavailable(*args, **kwargs):
        raise api_exceptions.ServiceUnavailable("Datastore down")

    monkeypatch.setattr(_datastore, "CLAIM_RELEASE_SECONDS", 0.2)
    monkeypatch.setattr(idempotency, "_release", unavailable)
    with pytest.raises(KeyError, match="own"):
        raises_its_own("own")
    assert RUNS == ["own"]
