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

import contextvars
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from ._config import settings


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
    #: The request carried App Engine's own task headers (X-AppEngine-*), not Cloud Tasks'
    #: HTTP-target ones (X-CloudTasks-*).
    app_engine: bool = False

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> TaskInfo | None:
        """The task a request's headers prove it runs, or None (see :func:`on_app_engine`).

        On App Engine only ``X-AppEngine-*`` task headers count: its front end strips them from
        requests that come from outside, so their presence means the request came from the
        task queue. ``X-CloudTasks-*`` headers (Cloud Tasks HTTP targets) reach the app from
        anyone, so there they never prove anything; off App Engine either family names the
        task (the local stack, tests, other hosts: the envelope's signature and its binding
        to the task's name and queue are what protect the app there). With
        ``settings().http_target`` set (Cloud Run) only a verified OIDC token proves it, then
        the ``X-CloudTasks-*`` headers name the task; raises
        :class:`~gae_deferred.http_target.TokenRefused` when the token is missing or bad.
        """
        return cls._read(headers.get, _HEADER_KEYS)

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> TaskInfo | None:
        """Same as from_headers, straight from a WSGI environ (the handler's fast path)."""
        return cls._read(environ.get, _ENVIRON_KEYS)

    @classmethod
    def _read(cls, get: Callable[[str], str | None], keys: Mapping[str, str]) -> TaskInfo | None:
        """The trust decision, in one place (docs/design.md, "What proves a task came from the
        queue"). ``keys`` maps each header name to how ``get`` spells it (itself, or a WSGI
        key)."""
        queue = get(keys["X-AppEngine-QueueName"])
        name = get(keys["X-AppEngine-TaskName"])
        prefix = "X-AppEngine-"
        target = settings().http_target
        if target is not None and not (queue and name and on_app_engine()):
            # HTTP target: only a verified OIDC token proves the queue sent it (Cloud Run does
            # not strip X-AppEngine-* from outside requests); raises TokenRefused.
            target.verify(get(keys["Authorization"]))
            prefix = "X-CloudTasks-"
            queue = get(keys["X-CloudTasks-QueueName"])
            name = get(keys["X-CloudTasks-TaskName"])
            if not queue or not name:
                return None
        elif not (queue and name):
            if on_app_engine():
                return None
            prefix = "X-AppEngine-" if queue else "X-CloudTasks-"
            queue = queue or get(keys["X-CloudTasks-QueueName"])
            name = name or get(keys["X-CloudTasks-TaskName"])
            if not queue or not name:
                return None
        return cls(
            name=name,
            queue=queue,
            retry_count=_int(get(keys[prefix + "TaskRetryCount"])),
            execution_count=_int(get(keys[prefix + "TaskExecutionCount"])),
            eta=_float(get(keys[prefix + "TaskETA"])),
            previous_response=_int(get(keys[prefix + "TaskPreviousResponse"])) or None,
            retry_reason=get(keys[prefix + "TaskRetryReason"]),
            app_engine=prefix == "X-AppEngine-",
        )


def on_app_engine() -> bool:
    """Whether this process runs on App Engine (``GAE_ENV`` set), where only App Engine's own
    task headers prove that a request came from the task queue.

    Read per request (one environment lookup), so a test can set GAE_ENV. Cloud Tasks HTTP
    targets prove where a request came from with an OIDC token instead of headers; accepting
    them on App Engine means verifying that token here, beside the header check.
    """
    return bool(os.environ.get("GAE_ENV"))


_HEADER_NAMES = [
    f"{prefix}{field}"
    for prefix in ("X-AppEngine-", "X-CloudTasks-")
    for field in (
        "QueueName",
        "TaskName",
        "TaskRetryCount",
        "TaskExecutionCount",
        "TaskETA",
        "TaskPreviousResponse",
        "TaskRetryReason",
    )
]
_HEADER_NAMES.append("Authorization")
_HEADER_KEYS = {name: name for name in _HEADER_NAMES}
#: WSGI environ keys of the task headers, computed once.
_ENVIRON_KEYS = {name: "HTTP_" + name.upper().replace("-", "_") for name in _HEADER_NAMES}


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


class running:
    """Make ``task`` the current task for the duration of the block.

    A plain class rather than ``@contextmanager``: it is on every task's path.
    """

    __slots__ = ("_task", "_token")

    def __init__(self, task: TaskInfo) -> None:
        self._task = task

    def __enter__(self) -> TaskInfo:
        self._token = _current.set(self._task)
        return self._task

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


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
