"""The status strip every dashboard page shows: tasks waiting and in flight in Cloud Tasks,
failures retrying and dead, runs processed in the last hour, iterate() jobs running.

Cost per page: three keys-only counts capped at :data:`STRIP_COUNT_CAP` and one Lookup of the
all-functions metrics series, so the strip agrees with the page under it. The Cloud Tasks part
is cached for :data:`STATUS_TTL` seconds per process: one ListQueues and one ListTasks page
(BASIC view, TASK_SCAN tasks) per queue. A task is in flight when Cloud Tasks dispatched it
more often than it got answers (``dispatch_count > response_count``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions

from .. import cloud_tasks, failures, iteration, metrics
from ..errors import Error
from ..failures import FailureState
from ..iteration import JobState
from ._common import TASK_SCAN

#: Seconds the Cloud Tasks numbers are reused by every page of this process.
STATUS_TTL = 10.0
#: The strip counts retrying and dead failures and running jobs up to here ("100+"): a count
#: reads the keys it counts, and the strip is on every page.
STRIP_COUNT_CAP = 100

_lock = threading.Lock()
_cached: tuple[float, dict[str, Any]] | None = None


def _scan_tasks() -> dict[str, Any]:
    waiting = in_flight = 0
    capped = False
    try:
        for queue in cloud_tasks.list_queues():
            name = cloud_tasks.short_name(queue.name)
            tasks, more = cloud_tasks.list_tasks_page(name, page_size=TASK_SCAN)
            capped = capped or more is not None
            for task in tasks:
                if task.dispatch_count > task.response_count:
                    in_flight += 1
                else:
                    waiting += 1
    except (api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError, Error) as exc:
        return {"waiting": None, "in_flight": None, "tasks_capped": False, "error": str(exc)}
    return {"waiting": waiting, "in_flight": in_flight, "tasks_capped": capped, "error": None}


def _tasks(max_age: float) -> dict[str, Any]:
    global _cached
    now = time.monotonic()
    with _lock:
        if _cached is not None and now - _cached[0] < max_age:
            return _cached[1]
    numbers = _scan_tasks()
    with _lock:
        _cached = (time.monotonic(), numbers)
    return numbers


def status(max_age: float = STATUS_TTL) -> dict[str, Any]:
    """The strip's numbers: ``waiting``/``in_flight`` None when Cloud Tasks cannot be asked
    (``error`` says why), reused for ``max_age`` seconds (0: asked now); ``*_capped`` mean
    "at least"."""
    model = failures.DeferredFailure
    retrying = model.query(model.state == FailureState.RETRYING).count_async(limit=STRIP_COUNT_CAP)
    dead = model.query(model.state == FailureState.DEAD).count_async(limit=STRIP_COUNT_CAP)
    job = iteration.DeferredJob
    jobs = job.query(
        job.state.IN([JobState.PLANNING, JobState.RUNNING, JobState.FINALIZING]),
        namespace=iteration.RECORDS_NAMESPACE,
    ).count_async(limit=STRIP_COUNT_CAP)
    processed = metrics.all_functions().window("1h").runs
    tasks = _tasks(max_age)
    return {
        **tasks,
        "error": f"Cloud Tasks: {tasks['error']}" if tasks["error"] else None,
        "retrying": retrying.result(),
        "dead": dead.result(),
        "failures_capped": max(retrying.result(), dead.result()) >= STRIP_COUNT_CAP,
        "processed": processed,
        "jobs_running": jobs.result(),
        "jobs_capped": jobs.result() >= STRIP_COUNT_CAP,
    }


def forget() -> None:
    """Drop the cached Cloud Tasks numbers: the next page asks again (after an action)."""
    global _cached
    with _lock:
        _cached = None
