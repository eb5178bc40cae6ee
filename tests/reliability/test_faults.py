"""Fault injection against the local stack (real processes): kill -9 the app mid-task, restart
each emulator mid-run, make one side of a defer fail, crash between commit and enqueue.

After each fault the run is reconciled: every deferred task ran at least once (or is visibly
pending or dead in ``_DeferredPayload`` / ``_DeferredFailure``), and nothing ran that was not
deferred.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
import uuid

import pytest
import rel_tasks
from google.cloud import ndb
from rel_helpers import (
    crash_child,
    payload_records,
    reconcile,
    reset_clients,
    restart_child,
    start_child,
    wait_for,
    wait_for_ids,
    wait_until_datastore_answers,
    wait_until_tasks_answer,
)

import gae_deferred
from gae_deferred import (
    DatastoreUnavailableError,
    EnqueueError,
    PayloadState,
    defer,
    spillover,
    sweep,
)
from gae_deferred.cloud_tasks import client as tasks_client, queue_path
from gae_deferred.local.stack import LocalStack
from tests.stack_support import datastore, queued_tasks

#: Random bytes do not compress, so this always spills (the task limit is 100 KB).
SPILL_BYTES = 150 * 1024


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _past_grace() -> datetime.datetime:
    """A sweep clock just past the grace period, as a cron run ten minutes from now would be."""
    grace = gae_deferred.settings().sweep_grace_seconds
    return spillover.now() + datetime.timedelta(seconds=grace + 1)


def _defer_batch(log: str, prefix: str, count: int, *, spill_every: int = 4) -> set[str]:
    """Defer ``count`` marks on the fault queue, every ``spill_every``-th one spilled."""
    ids = set()
    for number in range(count):
        task_id = f"{prefix}-{number}"
        payload = os.urandom(SPILL_BYTES) if number % spill_every == 0 else b""
        defer(rel_tasks.mark, log, task_id, payload, _queue="fault")
        ids.add(task_id)
    return ids


def _assert_reconciled(log: str, ids: set[str], queue: str = "fault") -> None:
    wait_for_ids(log, ids)
    wait_for(
        lambda: not [r for r in payload_records(queue) if r.state in ("pending", "retrying")],
        "spilled records of finished tasks to be deleted",
    )
    report = reconcile(log, ids, queue)
    assert report.lost == set() and report.unexpected == set(), report
    assert report.ran == len(ids)


def test_app_killed_mid_task_is_retried_after_restart(rel: LocalStack, log: str) -> None:
    defer(rel_tasks.slow_mark, log, "sleeper", 3.0, _queue="fault")
    wait_for(lambda: rel_tasks.read_log(log, "start")["sleeper"], "the slow task to start")

    rel.kill_app()
    # Deferred while the app is down: Cloud Tasks keeps them and retries the dispatch.
    down = _defer_batch(log, "while-down", 6, spill_every=3)
    time.sleep(1.0)
    assert rel_tasks.read_log(log)["sleeper"] == 0, "the killed attempt cannot have finished"
    start_child(rel, "app")

    _assert_reconciled(log, {"sleeper", *down})
    assert rel_tasks.read_log(log, "start")["sleeper"] >= 2, "the task was retried"


def test_datastore_restart_mid_run_loses_nothing(rel: LocalStack, log: str) -> None:
    before = _defer_batch(log, "ds-before", 40)

    restart_child(rel, "datastore")
    reset_clients()
    wait_until_datastore_answers()
    after = _defer_batch(log, "ds-after", 20)

    _assert_reconciled(log, before | after)


def test_tasks_emulator_restart_mid_run_loses_nothing(rel: LocalStack, log: str) -> None:
    # Paused first, so the restart certainly happens with tasks still queued.
    tasks_client().pause_queue(name=queue_path("fault"))
    before = _defer_batch(log, "ct-before", 40)
    tasks_client().resume_queue(name=queue_path("fault"))
    time.sleep(0.05)

    restart_child(rel, "cloudtasks")
    reset_clients()
    wait_until_tasks_answer()
    after = _defer_batch(log, "ct-after", 20)

    _assert_reconciled(log, before | after)


@pytest.fixture
def paused_outbox(rel: LocalStack):
    """The outbox queue paused and empty, so a created task stays visible; resumed after."""
    path = queue_path("outbox")
    tasks_client().pause_queue(name=path)
    tasks_client().purge_queue(name=path)
    yield path
    reset_clients()
    wait_until_tasks_answer()
    tasks_client().resume_queue(name=path)


def test_datastore_down_big_payload_raises_and_creates_no_task(
    rel: LocalStack, log: str, paused_outbox: str
) -> None:
    crash_child(rel, "datastore")
    try:
        started = time.monotonic()
        with pytest.raises(DatastoreUnavailableError, match="could not store"):
            defer(rel_tasks.mark, log, "no-ds", os.urandom(SPILL_BYTES), _queue="outbox")
        elapsed = time.monotonic() - started
    finally:
        restart_child(rel, "datastore")
    reset_clients()
    wait_until_datastore_answers()

    assert queued_tasks("outbox") == []
    assert payload_records("outbox") == []
    assert elapsed < 60, f"defer took {elapsed:.0f}s to give up"


def test_tasks_down_spilled_defer_raises_and_leaves_no_record(
    rel: LocalStack, log: str, paused_outbox: str
) -> None:
    crash_child(rel, "cloudtasks")
    try:
        with pytest.raises(EnqueueError):
            defer(rel_tasks.mark, log, "no-ct", os.urandom(SPILL_BYTES), _queue="outbox")
    finally:
        restart_child(rel, "cloudtasks")
    reset_clients()
    wait_until_tasks_answer()

    assert payload_records("outbox") == [], "the spill of a task never created was left behind"
    assert queued_tasks("outbox") == []


def test_tasks_down_transactional_defer_is_finished_by_the_sweeper(
    rel: LocalStack, log: str
) -> None:
    task_id = _id("outboxed")
    crash_child(rel, "cloudtasks")
    try:
        with datastore():
            # The transaction commits; the enqueue after it fails and is only logged.
            result = ndb.transaction(
                lambda: defer(rel_tasks.mark, log, task_id, _queue="outbox", _transactional=True)
            )
    finally:
        restart_child(rel, "cloudtasks")
    reset_clients()
    wait_until_tasks_answer()
    [record] = [r for r in payload_records("outbox") if r.key.id() == result.payload_id]
    assert record.state == PayloadState.PENDING

    _sweep_and_check_exactly_once(log, task_id)


def test_crash_between_commit_and_enqueue_is_repaired_by_the_sweeper(
    rel: LocalStack, log: str
) -> None:
    task_id = _id("crashed")
    child = subprocess.run(
        [sys.executable, "-c", _CRASHING_CHILD, log, task_id],
        env={**os.environ, **rel.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 17, child.stderr

    [record] = [r for r in payload_records("outbox") if task_id in (r.meta or {}).get("args", "")]
    assert record.state == PayloadState.PENDING and record.transactional
    assert queued_tasks("outbox") == [], "the child died before CreateTask"
    time.sleep(0.5)
    assert rel_tasks.read_log(log)[task_id] == 0

    _sweep_and_check_exactly_once(log, task_id)


def _sweep_and_check_exactly_once(log: str, task_id: str) -> None:
    assert sweep().reenqueued == 0, "inside the grace period nothing is re-enqueued"
    report = sweep(now=_past_grace())
    assert (report.reenqueued, report.errors) == (1, [])

    wait_for_ids(log, {task_id})
    wait_for(lambda: payload_records("outbox") == [], "the outboxed record to be deleted")
    # A later sweep finds nothing left to repair, and nothing runs twice.
    later = sweep(now=_past_grace() + datetime.timedelta(hours=1))
    assert (later.reenqueued, later.already_queued) == (0, 0)
    time.sleep(1.0)
    assert rel_tasks.read_log(log)[task_id] == 1
    assert reconcile(log, {task_id}, "outbox").lost == set()


#: A second process that commits a transactional defer and dies before CreateTask.
_CRASHING_CHILD = """
import os, sys
from google.cloud import ndb
import rel_tasks
from gae_deferred import defer, enqueue
from gae_deferred._datastore import client

def die(*args, **kwargs):
    os._exit(17)

enqueue.create_task = die
log, task_id = sys.argv[1:3]
with client().context():
    ndb.transaction(lambda: defer(rel_tasks.mark, log, task_id, _queue="outbox",
                                  _transactional=True))
sys.exit(0)
"""
