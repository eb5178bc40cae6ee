"""The status strip every dashboard page shows: tasks waiting and in flight in Cloud Tasks,
failures retrying and dead, runs processed in the last hour.

Cost, at most once per :data:`STATUS_TTL` seconds per process (the numbers are cached): one
ListQueues and one ListTasks page (BASIC view, TASK_SCAN tasks) per queue, two keys-only counts
capped at COUNT_CAP, one Lookup of the all-functions metrics series. A task is in flight when
Cloud Tasks dispatched it more often than it got answers (``dispatch_count > response_count``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions

from .. import cloud_tasks, failures, metrics
from ..errors import Error
from ..failures import FailureState
from ._common import COUNT_CAP, TASK_SCAN

#: Seconds the strip's numbers are reused by every page of this process.
STATUS_TTL = 10.0

_lock = threading.Lock()
_cached: tuple[float, dict[str, Any]] | None = None


def _tasks() -> tuple[int, int, bool]:
    waiting = in_flight = 0
    capped = False
    for queue in cloud_tasks.list_queues():
        name = cloud_tasks.short_name(queue.name)
        tasks, more = cloud_tasks.list_tasks_page(name, page_size=TASK_SCAN)
        capped = capped or more is not None
        for task in tasks:
            if task.dispatch_count > task.response_count:
                in_flight += 1
            else:
                waiting += 1
    return waiting, in_flight, capped


def compute() -> dict[str, Any]:
    """The strip's numbers now (no cache): ``waiting``/``in_flight`` None when Cloud Tasks
    cannot be asked; ``*_capped`` mean "at least"."""
    model = failures.DeferredFailure
    retrying = model.query(model.state == FailureState.RETRYING).count_async(limit=COUNT_CAP)
    dead = model.query(model.state == FailureState.DEAD).count_async(limit=COUNT_CAP)
    processed = metrics.all_functions().window("1h").runs
    error = None
    try:
        waiting, in_flight, tasks_capped = _tasks()
    except (api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError, Error) as exc:
        waiting = in_flight = None
        tasks_capped = False
        error = f"Cloud Tasks: {exc}"
    return {
        "waiting": waiting,
        "in_flight": in_flight,
        "tasks_capped": tasks_capped,
        "retrying": retrying.result(),
        "dead": dead.result(),
        "failures_capped": max(retrying.result(), dead.result()) >= COUNT_CAP,
        "processed": processed,
        "error": error,
    }


def status(max_age: float = STATUS_TTL) -> dict[str, Any]:
    """The strip's numbers, reused for ``max_age`` seconds (0: computed now)."""
    global _cached
    now = time.monotonic()
    with _lock:
        if _cached is not None and now - _cached[0] < max_age:
            return _cached[1]
    numbers = compute()
    with _lock:
        _cached = (time.monotonic(), numbers)
    return numbers


def forget() -> None:
    """Drop the cached numbers: the next page computes them (after an action changed them)."""
    global _cached
    with _lock:
        _cached = None
