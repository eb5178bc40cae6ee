"""What a running task can learn about itself.

Inside a deferred function::

    from gae_deferred import current_task

    def rebuild(account_id):
        task = current_task()
        if task.retry_count > 3:
            logging.warning("task %s on %s keeps failing", task.name, task.queue)

Outside a task, ``current_task()`` returns None and the helpers return None / 0.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """The App Engine task headers of the request running this task."""

    name: str
    queue: str
    retry_count: int = 0
    execution_count: int = 0
    eta: float | None = None
    previous_response: int | None = None
    retry_reason: str | None = None
    #: Set when the dashboard retriggered a recorded failure: that record tracks this run.
    failure_id: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> TaskInfo | None:
        """Read App Engine (or Cloud Tasks HTTP target) task headers; None if there are none.

        App Engine strips ``X-AppEngine-*`` headers from requests that come from outside, so
        their presence means the request came from the task queue.
        """
        queue = headers.get("X-AppEngine-QueueName") or headers.get("X-CloudTasks-QueueName")
        name = headers.get("X-AppEngine-TaskName") or headers.get("X-CloudTasks-TaskName")
        if not queue or not name:
            return None
        prefix = "X-AppEngine-" if headers.get("X-AppEngine-QueueName") else "X-CloudTasks-"
        return cls(
            name=name,
            queue=queue,
            retry_count=_int(headers.get(prefix + "TaskRetryCount")),
            execution_count=_int(headers.get(prefix + "TaskExecutionCount")),
            eta=_float(headers.get(prefix + "TaskETA")),
            previous_response=_int(headers.get(prefix + "TaskPreviousResponse")) or None,
            retry_reason=headers.get(prefix + "TaskRetryReason"),
            failure_id=headers.get("X-Deferred-Failure-Id") or None,
        )


def _int(value: str | None) -> int:
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        return 0


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


_current: contextvars.ContextVar[TaskInfo | None] = contextvars.ContextVar(
    "gae_deferred_task", default=None
)


@contextlib.contextmanager
def running(task: TaskInfo) -> Iterator[TaskInfo]:
    """Make ``task`` the current task for the duration of the block."""
    token = _current.set(task)
    try:
        yield task
    finally:
        _current.reset(token)


def current_task() -> TaskInfo | None:
    """The task being executed, or None outside a task."""
    return _current.get()


def task_name() -> str | None:
    task = _current.get()
    return task.name if task else None


def queue_name() -> str | None:
    task = _current.get()
    return task.queue if task else None


def task_retry_count() -> int:
    task = _current.get()
    return task.retry_count if task else 0


def task_execution_count() -> int:
    task = _current.get()
    return task.execution_count if task else 0
