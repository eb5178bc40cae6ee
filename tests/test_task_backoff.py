"""A task's own backoff (``_retry_options`` with min/max_backoff_seconds, max_doublings): each
retry is a new task due after legacy's backoff, and the attempt counts stay those of one task."""

from __future__ import annotations

import datetime
import os

import pytest

import gae_deferred
from gae_deferred import TaskRetryOptions, task_backoff
from gae_deferred.testing import capture_tasks
from tests.fixtures import ROOT

SEEN: list[tuple[str | None, int, int]] = []


def fail_until(attempts: int, padding: bytes = b"") -> None:
    SEEN.append(
        (
            gae_deferred.task_name(),
            gae_deferred.task_retry_count(),
            gae_deferred.task_execution_count(),
        )
    )
    if gae_deferred.task_retry_count() < attempts:
        raise ValueError(f"attempt {gae_deferred.task_retry_count()}")


@pytest.fixture(autouse=True)
def _clear():
    SEEN.clear()


@pytest.mark.parametrize(
    ("retry_number", "seconds"),
    [(1, 10), (2, 20), (3, 40), (4, 80), (5, 160), (6, 240), (7, 300), (30, 300)],
)
def test_backoff_is_legacys(retry_number, seconds):
    # taskqueue_stub Retry.CalculateBackoffUsec: double max_doublings times, then linear, capped.
    options = {"min_backoff_seconds": 10, "max_backoff_seconds": 300, "max_doublings": 3}
    assert task_backoff.backoff_seconds(options, retry_number) == seconds


def test_unset_fields_take_legacys_defaults():
    assert task_backoff.backoff_seconds({"max_doublings": 2}, 1) == pytest.approx(0.1)
    assert task_backoff.backoff_seconds({"min_backoff_seconds": 1000}, 16) == 3600


@pytest.mark.parametrize("padding", [0, 300_000], ids=["inline", "spilled"])
def test_each_retry_is_a_new_task_due_after_the_tasks_backoff_counting_on(padding):
    options = TaskRetryOptions(task_retry_limit=3, min_backoff_seconds=30, max_doublings=1)
    with capture_tasks(queue_yaml=ROOT / "queue.yaml") as queue:
        first = gae_deferred.defer(
            fail_until, 2, os.urandom(padding), _retry_options=options, _headers={"X-Mine": "1"}
        )
        assert first.spilled is bool(padding)
        delays = []
        for number in (1, 2):
            with pytest.raises(ValueError, match=f"attempt {number - 1}"):
                queue.run(queue.tasks[0])
            (retry,) = queue.tasks
            assert retry.name == f"{first.name}-r{number}"
            assert retry.retry_count == 0  # Cloud Tasks' count for the new task...
            assert retry.headers["X-Mine"] == "1" and retry.url == first.url
            delays.append((retry.eta - datetime.datetime.now(datetime.UTC)).total_seconds())
        queue.run(queue.tasks[0])
        assert queue.tasks == []
    # ...and the handler's: the function sees one task's attempts 0, 1, 2.
    assert [(retries, runs) for _, retries, runs in SEEN] == [(0, 0), (1, 1), (2, 2)]
    assert [name for name, _, _ in SEEN] == [first.name, f"{first.name}-r1", f"{first.name}-r2"]
    # Legacy backoffs: 30 s, then 60 s (one doubling).
    assert delays[0] == pytest.approx(30, abs=5) and delays[1] == pytest.approx(60, abs=5)


def test_the_tasks_limit_counts_across_its_retry_tasks():
    options = TaskRetryOptions(task_retry_limit=1, min_backoff_seconds=1)
    with capture_tasks(queue_yaml=ROOT / "queue.yaml") as queue:
        task = gae_deferred.defer(fail_until, 5, _retry_options=options)
        with pytest.raises(ValueError, match="attempt 0"):
            queue.run_all()
        with pytest.raises(ValueError, match="attempt 1"):
            queue.run_all()
        assert queue.tasks == []  # limit 1: two deliveries, as legacy made
        record = gae_deferred.failures.get(gae_deferred.failures.failure_id("default", task.name))
        assert record.state == "dead" and record.attempts == 2
        assert record.exception_type == "ValueError" and "attempt 1" in record.message
    assert [retries for _, retries, _ in SEEN] == [0, 1]


def test_without_backoff_fields_cloud_tasks_retries_the_same_task():
    with capture_tasks(queue_yaml=ROOT / "queue.yaml") as queue:
        task = gae_deferred.defer(fail_until, 1, _retry_options={"task_retry_limit": 3})
        with pytest.raises(ValueError):
            queue.run_all()
        (again,) = queue.tasks
        assert again.name == task.name and again.retry_count == 1
        queue.run_all()
