"""defer() from this process into the real stack: every task outcome, observed end to end."""

from __future__ import annotations

import itertools
import os
import pathlib
import time
import uuid

import e2e_tasks
import pytest
import requests
from e2e_helpers import failure_state, payload_exists, wait_for_runs
from google.cloud import ndb

import gae_deferred
from gae_deferred import defer, serialize
from gae_deferred.local.stack import LocalStack
from tests.stack_support import datastore, holds_for, wait_for

# Real processes: both emulators and gunicorn (the session stack in conftest.py).
pytestmark = pytest.mark.e2e


def test_small_task_runs_inline_in_the_app(e2e: LocalStack, run_dir: pathlib.Path) -> None:
    task = defer(e2e_tasks.record, str(run_dir), "small")

    assert not task.spilled
    [run] = wait_for_runs(run_dir, "small", 1)
    assert run["task_name"] == task.name
    assert run["queue"] == "default"
    assert run["pid"] != os.getpid()


def test_closure_capturing_a_local_runs(e2e: LocalStack, run_dir: pathlib.Path) -> None:
    label = f"closure-{uuid.uuid4().hex[:8]}"
    directory = str(run_dir)

    defer(lambda: e2e_tasks.record(directory, label))

    wait_for_runs(run_dir, label, 1)


def test_600kb_argument_spills_and_its_record_goes_after_success(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    # Random bytes: the envelope compresses, and a repetitive payload would not spill.
    payload = os.urandom(600 * 1024)

    task = defer(e2e_tasks.record, str(run_dir), "spill", payload)

    assert task.spilled and task.chunks == 1 and task.payload_id
    [run] = wait_for_runs(run_dir, "spill", 1)
    assert run["arg_bytes"] == len(payload)
    wait_for(lambda: not payload_exists(task.payload_id), "the spilled record to be deleted")


def test_3mb_argument_is_chunked_and_runs(e2e: LocalStack, run_dir: pathlib.Path) -> None:
    payload = os.urandom(3 * 1024 * 1024)

    task = defer(e2e_tasks.record, str(run_dir), "chunked", payload)

    assert task.spilled and task.chunks >= 3
    [run] = wait_for_runs(run_dir, "chunked", 1, timeout=40)
    assert run["arg_bytes"] == len(payload)
    wait_for(lambda: not payload_exists(task.payload_id), "the chunked record to be deleted")


def test_failing_task_is_retried_with_backoff_then_resolved(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    task = defer(e2e_tasks.fail_until, str(run_dir), "flaky", 2)

    runs = wait_for_runs(run_dir, "flaky", 3)
    assert [run["retry_count"] for run in runs] == [0, 1, 2]
    # tests/e2e/queue.yaml: min_backoff 0.2 s, doubling.
    assert runs[1]["time"] - runs[0]["time"] >= 0.15
    assert runs[2]["time"] - runs[1]["time"] >= 0.3
    wait_for(lambda: failure_state("default", task.name) == "resolved", "failure resolved")


def test_retry_limit_exhausted_leaves_a_dead_failure(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    # The per-task limit matches tests/e2e/queue.yaml's (3): the app decides "dead" from it,
    # because main.py configures the repository's queue.yaml (limit 5) for the app.
    task = defer(
        e2e_tasks.always_fail, str(run_dir), "doomed", _retry_options={"task_retry_limit": 3}
    )

    runs = wait_for_runs(run_dir, "doomed", 4)
    assert [run["retry_count"] for run in runs] == [0, 1, 2, 3]
    wait_for(lambda: failure_state("default", task.name) == "dead", "failure record dead")
    holds_for(lambda: len(e2e_tasks.runs(run_dir, "doomed")) == 4, "no retry beyond the limit", 1.5)


def test_task_retry_options_give_legacys_deliveries_on_cloud_tasks(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    # tests/e2e/queue.yaml lets the default queue retry 3 times; the task's own limit of 1
    # gives 2 deliveries, as legacy made, and its dead letter names the real exception.
    options = gae_deferred.TaskRetryOptions(task_retry_limit=1)
    task = defer(e2e_tasks.always_fail, str(run_dir), "own-limit", _retry_options=options)

    runs = wait_for_runs(run_dir, "own-limit", 2)
    wait_for(lambda: failure_state("default", task.name) == "dead", "failure record dead")
    time.sleep(1.5)
    assert [run["retry_count"] for run in e2e_tasks.runs(run_dir, "own-limit")] == [0, 1]
    assert [run["retry_count"] for run in runs] == [0, 1]
    with datastore():
        record = gae_deferred.failures.get(gae_deferred.failures.failure_id("default", task.name))
    assert record.exception_type == "ValueError" and record.attempts == 2
    assert "own-limit: always fails" in record.traceback


def test_task_backoff_is_honoured_on_cloud_tasks_with_legacys_counts(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    # The queue retries after 0.2-1 s; the task's own options: after 1.5 s, then 3 s.
    options = gae_deferred.TaskRetryOptions(
        task_retry_limit=2, min_backoff_seconds=1.5, max_backoff_seconds=10
    )
    task = defer(e2e_tasks.always_fail, str(run_dir), "own-backoff", _retry_options=options)

    runs = wait_for_runs(run_dir, "own-backoff", 3, timeout=30)
    wait_for(lambda: failure_state("default", task.name) == "dead", "failure record dead")
    time.sleep(1.5)
    runs = e2e_tasks.runs(run_dir, "own-backoff")
    assert [run["retry_count"] for run in runs] == [0, 1, 2]
    assert [run["task_name"] for run in runs] == [task.name, f"{task.name}-r1", f"{task.name}-r2"]
    gaps = [later["time"] - earlier["time"] for earlier, later in itertools.pairwise(runs)]
    assert 1.5 <= gaps[0] < 2.5 and 3.0 <= gaps[1] < 4.0, gaps
    with datastore():
        record = gae_deferred.failures.get(gae_deferred.failures.failure_id("default", task.name))
    assert record.attempts == 3 and record.exception_type == "ValueError"


def test_permanent_failure_answers_200_and_is_not_retried(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    task = defer(e2e_tasks.give_up, str(run_dir), "permanent")

    wait_for_runs(run_dir, "permanent", 1)
    wait_for(lambda: failure_state("default", task.name) == "permanent", "permanent failure")
    access_line = '/_ah/queue/deferred/e2e_tasks.give_up HTTP/1.1" 200'
    wait_for(lambda: access_line in e2e.log_file("app").read_text(), "a 200 in the access log")
    holds_for(lambda: len(e2e_tasks.runs(run_dir, "permanent")) == 1, "no retry", 1)


def test_named_task_is_deduplicated(e2e: LocalStack, run_dir: pathlib.Path) -> None:
    name = f"e2e-named-{uuid.uuid4().hex}"

    task = defer(e2e_tasks.record, str(run_dir), "named", _name=name)
    with pytest.raises(gae_deferred.TaskAlreadyExistsError):
        defer(e2e_tasks.record, str(run_dir), "named", _name=name)

    assert task.name == name
    [run] = wait_for_runs(run_dir, "named", 1)
    assert run["task_name"] == name
    # Still refused after it ran: Cloud Tasks keeps names for about an hour.
    with pytest.raises(gae_deferred.TaskAlreadyExistsError):
        defer(e2e_tasks.record, str(run_dir), "named", _name=name)


def test_countdown_task_does_not_run_before_its_time(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    started = time.time()

    defer(e2e_tasks.record, str(run_dir), "countdown", _countdown=3)

    # Polled until 2.5 s of its 3 s countdown have passed.
    holds_for(
        lambda: e2e_tasks.runs(run_dir, "countdown") == [],
        "the countdown task not to run early",
        started + 2.5 - time.time(),
    )
    [run] = wait_for_runs(run_dir, "countdown", 1)
    assert run["time"] >= started + 3 - 0.05


def _task_headers(name: str) -> dict[str, str]:
    return {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": name}


def test_forged_task_posts_get_403_and_run_nothing(e2e: LocalStack, run_dir: pathlib.Path) -> None:
    url = e2e.app_url + "/_ah/queue/deferred"
    genuine = serialize(e2e_tasks.record, str(run_dir), "forged")
    gae_deferred.configure(signing_key="ab" * 32)
    other_key = serialize(e2e_tasks.record, str(run_dir), "forged")
    tampered = genuine[:-40] + bytes([genuine[-40] ^ 1]) + genuine[-39:]

    answers = [
        requests.post(url, data=genuine, timeout=10),  # signed, but no task headers
        requests.post(url, data=other_key, headers=_task_headers("forged-1"), timeout=10),
        requests.post(url, data=tampered, headers=_task_headers("forged-2"), timeout=10),
        requests.post(url, data=b"not an envelope", headers=_task_headers("forged-3"), timeout=10),
    ]

    assert [answer.status_code for answer in answers] == [403, 403, 403, 403]
    holds_for(lambda: e2e_tasks.runs(run_dir, "forged") == [], "no forged task runs", 0.5)


class E2eOrder(ndb.Model):
    total = ndb.IntegerProperty()


@pytest.mark.parametrize("commits", [True, False])
def test_spilled_defers_inside_a_transaction_on_the_stack(
    e2e: LocalStack, run_dir: pathlib.Path, commits: bool
) -> None:
    """Inside @ndb.transactional(): a spilled defer without _transactional runs once whether the
    transaction commits or rolls back; with _transactional=True it runs only on commit."""
    label = f"txn-{commits}"
    payload = os.urandom(300_000)

    @ndb.transactional()
    def place() -> None:
        E2eOrder(id=label, total=1).put()
        defer(e2e_tasks.record, str(run_dir), f"{label}-plain", payload)
        defer(e2e_tasks.record, str(run_dir), f"{label}-outbox", payload, _transactional=True)
        if not commits:
            raise RuntimeError("roll back")

    with gae_deferred.ndb_context():
        if commits:
            place()
        else:
            with pytest.raises(RuntimeError):
                place()
    [run] = wait_for_runs(run_dir, f"{label}-plain", 1)
    assert run["arg_bytes"] == len(payload)
    if commits:
        wait_for_runs(run_dir, f"{label}-outbox", 1)
    holds_for(
        lambda: (
            len(e2e_tasks.runs(run_dir, f"{label}-plain")) == 1
            and len(e2e_tasks.runs(run_dir, f"{label}-outbox")) == int(commits)
        ),
        "each task to run once (the outbox one only on commit)",
        1.0,
    )
