"""The sweeper repairs a crash between commit and enqueue, and purges expired dead letters."""

from __future__ import annotations

import datetime
import os

import webapp2
import webtest
from google.cloud import ndb

import gae_deferred
from gae_deferred import (
    FailureState,
    PayloadState,
    defer,
    envelope,
    failures,
    spillover,
    sweep,
)
from gae_deferred.cloud_tasks import client as tasks_client
from gae_deferred.webapp2 import deferred_routes
from tests.fixtures import collect

CALLS: list = []


def later(days=0, seconds=0):
    return spillover.now() + datetime.timedelta(days=days, seconds=seconds)


def test_crash_between_commit_and_enqueue_is_repaired(paused, monkeypatch):
    # Cloud Tasks unreachable at commit time: the transaction commits, the enqueue fails.
    real_host = os.environ["CLOUD_TASKS_EMULATOR_HOST"]
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:9")
    gae_deferred.cloud_tasks.reset_client()

    result = ndb.transaction(lambda: defer(collect, "paid", _transactional=True))

    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", real_host)
    gae_deferred.cloud_tasks.reset_client()
    assert paused() == []
    assert spillover.get(result.payload_id).state == PayloadState.PENDING

    assert sweep().reenqueued == 0  # still inside the grace period
    report = sweep(now=later(seconds=gae_deferred.settings().sweep_grace_seconds + 1))
    assert report.reenqueued == 1 and report.errors == []
    (task,) = paused()
    assert task.name.endswith("/tasks/" + result.name)

    # The repaired task runs the original payload.
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    headers = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": result.name}
    assert app.post("/_ah/queue/deferred", task.app_engine_http_request.body, headers=headers)
    assert spillover.get(result.payload_id) is None


def test_task_that_exists_is_not_duplicated(paused):
    result = defer(collect, os.urandom(200_000))
    report = sweep(now=later(days=1))
    assert (report.reenqueued, report.already_queued) == (0, 1)
    assert len(paused()) == 1
    # Checked again only after another grace period.
    assert spillover.get(result.payload_id).eta > spillover.now() + datetime.timedelta(hours=23)


def test_a_deleted_tasks_held_name_does_not_block_the_repair(paused):
    """Cloud Tasks keeps the name of a deleted (or purged) task for an hour or more: the
    sweeper creates the task under a fresh name instead of waiting for it to come free."""
    result = defer(collect, os.urandom(200_000))
    tasks_client().delete_task(name=paused()[0].name)
    report = sweep(now=later(days=1))
    assert (report.reenqueued, report.already_queued, report.errors) == (1, 0, [])
    (task,) = paused()
    record = spillover.get(result.payload_id)
    assert record.task_name.startswith("s-") and task.name.endswith("/tasks/" + record.task_name)
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    headers = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": record.task_name}
    app.post("/_ah/queue/deferred", task.app_engine_http_request.body, headers=headers, status=200)
    assert spillover.get(result.payload_id) is None


def test_enqueue_failure_is_reported_and_retried_later(paused, monkeypatch):
    result = defer(collect, os.urandom(200_000))
    tasks_client().delete_task(name=paused()[0].name)
    record = spillover.get(result.payload_id)
    record.queue = "missing-queue"
    record.put()
    report = sweep(now=later(days=1))
    assert report.reenqueued == 0 and "missing-queue" in report.errors[0]
    assert spillover.get(result.payload_id).state == PayloadState.PENDING


def test_dead_letters_are_purged_after_retention(ndb_stub):
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    headers = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "t"}
    body = envelope.build(_fail, task="t", queue="default")
    app.post("/_ah/queue/deferred", body, headers=headers, status=200)
    (record,) = failures.DeferredFailure.query().fetch()
    assert record.state == FailureState.PERMANENT
    assert sweep(now=later(days=29)).purged_failures == 0
    assert sweep(now=later(days=31)).purged_failures == 1
    assert failures.DeferredFailure.query().fetch() == []
    assert failures.get_payload(record.id) is None
    assert failures.DeferredFailureGroup.query().fetch() == []


def test_failed_spilled_payloads_are_purged_after_retention(ndb_stub):
    record, chunks = spillover.build_record(
        "p1",
        b"x" * 10,
        {"function": "f"},
        queue="default",
        task_name="t",
        eta=spillover.now(),
        task={},
    )
    record.state = PayloadState.DEAD
    spillover.write_many([(record, chunks)])
    assert sweep(now=later(days=31)).purged_payloads == 1
    assert spillover.get("p1") is None
    assert spillover.DeferredPayloadChunk.query().fetch(keys_only=True) == []


def _fail():
    raise gae_deferred.PermanentTaskFailure("no")


def _stuck_transactional_defer(monkeypatch) -> gae_deferred.DeferredTask:
    """A committed transactional defer whose task was never created (Cloud Tasks down)."""
    real_host = os.environ["CLOUD_TASKS_EMULATOR_HOST"]
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:9")
    gae_deferred.cloud_tasks.reset_client()
    result = ndb.transaction(lambda: defer(collect, "paid", _transactional=True))
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", real_host)
    gae_deferred.cloud_tasks.reset_client()
    return result


def _deliver(task, name: str) -> None:
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    headers = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": name}
    app.post("/_ah/queue/deferred", task.app_engine_http_request.body, headers=headers, status=200)


def test_a_task_that_runs_while_the_sweep_repairs_it_stays_done(paused, monkeypatch):
    """The sweeper creates the task, the task runs at once (deleting its record), then the
    sweeper notes the repair: it must not write its old copy back (the record came back as
    pending for ever and was re-enqueued on every sweep)."""
    from gae_deferred import enqueue

    result = _stuck_transactional_defer(monkeypatch)
    create = enqueue.enqueue_record

    def create_and_run(record, **options):
        created = create(record, **options)
        (task,) = paused()
        _deliver(task, record.task_name)
        return created

    monkeypatch.setattr(enqueue, "enqueue_record", create_and_run)
    report = sweep(now=later(days=1))
    assert (report.reenqueued, report.finished_meanwhile, report.errors) == (1, 1, [])
    assert spillover.get(result.payload_id) is None
    monkeypatch.setattr(enqueue, "enqueue_record", create)
    assert sweep(now=later(days=2)).reenqueued == 0


def test_a_task_that_fails_while_the_sweep_repairs_it_keeps_its_failure(paused, monkeypatch):
    """Same race, the run failing for good: the record keeps the state the run gave it."""
    from gae_deferred import enqueue

    real_host = os.environ["CLOUD_TASKS_EMULATOR_HOST"]
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:9")
    gae_deferred.cloud_tasks.reset_client()
    result = ndb.transaction(lambda: defer(_fail_for_good, _transactional=True))
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", real_host)
    gae_deferred.cloud_tasks.reset_client()
    create = enqueue.enqueue_record

    def create_and_run(record, **options):
        created = create(record, **options)
        (task,) = paused()
        _deliver(task, record.task_name)
        return created

    monkeypatch.setattr(enqueue, "enqueue_record", create_and_run)
    sweep(now=later(days=1))
    assert spillover.get(result.payload_id).state == PayloadState.PERMANENT


def _fail_for_good() -> None:
    raise gae_deferred.PermanentTaskFailure("no")
