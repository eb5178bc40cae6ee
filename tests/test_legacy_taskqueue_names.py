"""Legacy ``taskqueue`` names: the exceptions legacy ``except`` clauses name, TaskRetryOptions,
and the ``taskqueue.Task`` attributes of what defer() returns.

The legacy hierarchy (google/appengine/api/taskqueue/taskqueue.py of the last SDK, 1.9.88):
``Error`` <- ``UnknownQueueError``, ``InvalidTaskError``, ``BadTransactionStateError``,
``InvalidTaskRetryOptionsError``; ``InvalidTaskError`` <- ``InvalidTaskNameError``,
``TaskAlreadyExistsError``, ``TombstonedTaskError``. gae_deferred keeps every one of those
relations and adds one: a ``TombstonedTaskError`` is a ``TaskAlreadyExistsError`` too.
"""

from __future__ import annotations

import datetime
import math
import os

import pytest

import gae_deferred as deferred
from gae_deferred import cloud_tasks
from gae_deferred.testing import capture_tasks
from tests.callables import add
from tests.fixtures import ROOT

LEGACY_BASES = {
    "UnknownQueueError": "DeferError",
    "InvalidTaskError": "DeferError",
    "BadTransactionStateError": "DeferError",
    "InvalidTaskRetryOptionsError": "DeferError",
    "InvalidTaskNameError": "InvalidTaskError",
    "TaskAlreadyExistsError": "InvalidTaskError",
    "TombstonedTaskError": "InvalidTaskError",
}


@pytest.mark.parametrize(("name", "base"), sorted(LEGACY_BASES.items()))
def test_legacy_exception_hierarchy_is_kept(name, base):
    assert issubclass(getattr(deferred, name), getattr(deferred, base))
    assert name in deferred.__all__


def test_a_tombstoned_name_is_also_an_existing_task():
    assert issubclass(deferred.TombstonedTaskError, deferred.TaskAlreadyExistsError)


def test_duplicate_then_tombstoned_name_on_cloud_tasks(paused):
    deferred.defer(add, 1, _name="once")
    with pytest.raises(deferred.TaskAlreadyExistsError) as queued:
        deferred.defer(add, 2, _name="once")
    assert not isinstance(queued.value, deferred.TombstonedTaskError)
    cloud_tasks.delete_task("default", "once")
    # The legacy clause that told the two apart.
    try:
        deferred.defer(add, 3, _name="once")
    except deferred.TombstonedTaskError as exc:
        assert "ran or was deleted recently" in str(exc)
    else:
        pytest.fail("a deleted task's name was accepted again")
    assert [task.name.rsplit("/", 1)[1] for task in paused()] == []


def test_duplicate_then_tombstoned_name_in_a_capture():
    with capture_tasks(queue_yaml=ROOT / "queue.yaml") as queue:
        deferred.defer(add, 1, _name="once")
        with pytest.raises(deferred.TaskAlreadyExistsError) as queued:
            deferred.defer(add, 2, _name="once")
        assert not isinstance(queued.value, deferred.TombstonedTaskError)
        queue.run_all()
        with pytest.raises(deferred.TombstonedTaskError):
            deferred.defer(add, 3, _name="once")


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"_name": "not a name!"}, "InvalidTaskNameError"),
        ({"_countdown": -1}, "InvalidTaskError"),
        ({"_eta": "tomorrow"}, "InvalidTaskError"),
        ({"_url": "relative"}, "InvalidTaskError"),
        ({"_target": "a.b.c"}, "InvalidTaskError"),
        ({"_queue": "not-in-queue-yaml"}, "UnknownQueueError"),
        ({"_transactional": True}, "BadTransactionStateError"),
        (
            {"_retry_options": {"min_backoff_seconds": 5, "max_backoff_seconds": 1}},
            "InvalidTaskRetryOptionsError",
        ),
    ],
)
def test_legacy_except_clauses_catch_what_defer_raises(paused, options, error):
    with pytest.raises(getattr(deferred, error)):
        deferred.defer(add, 1, **options)
    assert paused() == []


def test_task_retry_options_checks_as_legacy_did():
    options = deferred.TaskRetryOptions(
        task_retry_limit=3, task_age_limit=1.2, min_backoff_seconds=2
    )
    assert (options.task_retry_limit, options.task_age_limit, options.min_backoff_seconds) == (
        3,
        2,
        2,
    )
    assert options.max_backoff_seconds is None and options.max_doublings is None
    with pytest.raises(TypeError, match="Invalid arguments: retries"):
        deferred.TaskRetryOptions(retries=1)
    for bad in ({"task_retry_limit": -1}, {"max_doublings": -1}, {"task_age_limit": -5}):
        with pytest.raises(deferred.InvalidTaskRetryOptionsError):
            deferred.TaskRetryOptions(**bad)
    with pytest.raises(deferred.InvalidTaskRetryOptionsError, match="less than the minimum"):
        deferred.TaskRetryOptions(min_backoff_seconds=10, max_backoff_seconds=5)


def test_deferred_task_has_the_legacy_task_attributes(paused):
    options = deferred.TaskRetryOptions(task_retry_limit=2, min_backoff_seconds=5)
    eta = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=2)
    task = deferred.defer(
        add, 1, _eta=eta, _target="v2.worker", _retry_options=options, _headers={"X-A": "b"}
    )
    assert task.method == "POST"
    assert task.retry_count == 0 and task.tag is None and task.was_deleted is False
    assert task.target == "v2.worker"
    assert task.retry_options == options
    assert task.eta_posix == eta.timestamp() and math.isclose(task.eta_posix, eta.timestamp())
    (queued,) = paused()
    request = queued.app_engine_http_request
    headers = {"Content-Type": "application/octet-stream", "X-A": "b"}
    assert dict(task.headers) == headers
    # legacy Task.size: method + body + URL + each header as "key: value\r\n"
    expected = (
        len("POST")
        + len(request.body)
        + len(request.relative_uri)
        + sum(len(k) + len(v) + 4 for k, v in headers.items())
    )
    assert task.size == expected
    plain = deferred.defer(add, 2)
    assert plain.target is None and plain.retry_options is None


def test_spilled_deferred_task_keeps_target_and_retry_options(paused):
    deferred.configure(spill_threshold=1000)
    task = deferred.defer(
        add, os.urandom(5000), _target="worker", _retry_options={"task_retry_limit": 4}
    )
    assert task.spilled and task.target == "worker"
    assert task.retry_options == deferred.TaskRetryOptions(task_retry_limit=4)


def test_transactional_defer_outside_a_transaction_is_bad_transaction_state(paused):
    with pytest.raises(deferred.BadTransactionStateError), deferred.batch() as batch:
        batch.defer(add, 1, _transactional=True)
    assert paused() == []
