"""The Cloud Tasks gateway: every call gae_deferred makes to Cloud Tasks goes through here.

Resource paths, the task description (:class:`TaskSpec`), CreateTask with its errors turned into
gae_deferred's, and the queue and task calls of the dashboard, all with one timeout
(``settings().cloud_tasks_timeout_seconds``)::

    from gae_deferred import cloud_tasks

    spec = cloud_tasks.TaskSpec(queue="reports", url="/_ah/queue/deferred", headers={}, eta=now)
    cloud_tasks.create_task(spec, body)          # TaskAlreadyExistsError, QueueNotFoundError...
    cloud_tasks.pause_queue("reports")
    cloud_tasks.client().list_tasks(parent=cloud_tasks.queue_path("reports"))

Set ``CLOUD_TASKS_EMULATOR_HOST=127.0.0.1:8123`` to talk to the local emulator over a plain
gRPC channel without credentials; otherwise the client uses Google's endpoint and Application
Default Credentials.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Protocol

import grpc
from google.api_core import exceptions as api_exceptions
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

from . import _outcome, http_target
from ._config import settings
from .errors import (
    ConfigurationError,
    EnqueueError,
    EnqueueOutcomeUnknown,
    QueueNotFoundError,
    TaskAlreadyExistsError,
    TombstonedTaskError,
)

EMULATOR_HOST_ENV = "CLOUD_TASKS_EMULATOR_HOST"


@functools.lru_cache(maxsize=1)
def _cached_client(emulator_host: str | None) -> tasks_v2.CloudTasksClient:
    if emulator_host:
        channel = grpc.insecure_channel(emulator_host)
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    return tasks_v2.CloudTasksClient()


def client() -> tasks_v2.CloudTasksClient:
    """The process's CloudTasksClient (the emulator's when CLOUD_TASKS_EMULATOR_HOST is set)."""
    return _cached_client(os.environ.get(EMULATOR_HOST_ENV) or None)


def reset_client() -> None:
    """Forget the cached client, so the next call reads CLOUD_TASKS_EMULATOR_HOST again."""
    _cached_client.cache_clear()


class TaskSink(Protocol):
    """Receives created tasks instead of Cloud Tasks (see :mod:`gae_deferred.testing`)."""

    def create_task(self, parent: str, task: tasks_v2.Task) -> tasks_v2.Task: ...

    def new_task_name(self, prefix: str) -> str: ...

    def has_task(self, name: str) -> bool: ...


#: Set by gae_deferred.testing.capture_tasks(): CreateTask goes there instead of Cloud Tasks.
_sink: TaskSink | None = None


# -- paths --------------------------------------------------------------------------------


def location_path() -> str:
    """``projects/P/locations/L`` from the settings."""
    current = settings()
    if not current.project:
        raise ConfigurationError("no project: set GOOGLE_CLOUD_PROJECT or configure(project=...)")
    return f"projects/{current.project}/locations/{current.location}"


def queue_path(queue: str) -> str:
    return f"{location_path()}/queues/{queue}"


def task_path(queue: str, task: str) -> str:
    current = settings()
    if not current.project:
        location_path()  # raises ConfigurationError
    return f"{_queue_path(current.project, current.location, queue)}/tasks/{task}"


@functools.lru_cache(maxsize=256)
def _queue_path(project: str, location: str, queue: str) -> str:
    # Every defer() names its task by path; a process uses a handful of queues.
    return f"projects/{project}/locations/{location}/queues/{queue}"


def new_task_name(prefix: str = "d") -> str:
    """A name for a task its caller did not name: ``d-<32 random hex>``.

    Random names are what Cloud Tasks spreads best, and one is never reused. Under
    ``gae_deferred.testing.capture_tasks()`` the capture names tasks as testbed did (task1...).
    """
    if _sink is not None:
        return _sink.new_task_name(prefix)
    return f"{prefix}-{os.urandom(16).hex()}"  # secrets.token_hex(16), without its frame


def short_name(path: str) -> str:
    """The last segment of a resource path: a queue's or a task's own name."""
    return path.rsplit("/", 1)[-1]


logger = logging.getLogger("gae_deferred")


# -- creating tasks -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, init=False)
class TaskSpec:
    """Where and how a task is delivered: everything but its body."""

    queue: str
    url: str
    headers: dict[str, str]
    eta: datetime.datetime
    name: str | None = None
    routing: dict[str, str] = dataclasses.field(default_factory=dict)

    def __init__(
        self,
        queue: str,
        url: str,
        headers: dict[str, str],
        eta: datetime.datetime,
        name: str | None = None,
        routing: dict[str, str] | None = None,
    ) -> None:
        # Frozen all the same (no setattr): the instance dict written directly instead of the
        # generated __init__'s object.__setattr__ per field, a tenth of a small defer()'s CPU.
        fields = self.__dict__
        fields["queue"] = queue
        fields["url"] = url
        fields["headers"] = headers
        fields["eta"] = eta
        fields["name"] = name
        fields["routing"] = {} if routing is None else routing

    def to_json(self) -> dict[str, Any]:
        """What a spilled record stores to recreate the same task later."""
        return {"url": self.url, "headers": self.headers, "routing": self.routing}

    def size(self, body: bytes) -> int:
        """Bytes Cloud Tasks counts against its task size limit."""
        header_bytes = sum(len(k) + len(v) for k, v in self.headers.items())
        return len(body) + len(self.url) + header_bytes


_TaskPb = tasks_v2.Task.pb()
_wrap_task = tasks_v2.Task.wrap
_POST = tasks_v2.HttpMethod.POST.value
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def build_task(spec: TaskSpec, body: bytes) -> tasks_v2.Task:
    """The Cloud Tasks request body for a task (exposed for tests and tooling).

    Built as the raw protobuf and wrapped once: proto-plus marshals every field of a nested
    constructor through Python, which cost more than the rest of defer() together.
    """
    task = _TaskPb()
    target = settings().http_target
    if target is None:
        request = task.app_engine_http_request
        request.relative_uri = spec.url
        if spec.routing:
            routing = request.app_engine_routing
            for field, value in spec.routing.items():
                setattr(routing, field, value)
    else:
        request = http_target.build_request(task, target, spec.url, spec.routing)
    request.http_method = _POST
    headers = request.headers
    # Item by item: the map's update() goes through the generic MutableMapping path.
    for name, value in spec.headers.items():
        headers[name] = value
    request.body = body
    # Exact integer arithmetic, without Timestamp.FromDatetime's pure-Python conversion.
    eta = spec.eta
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=datetime.UTC)
    since_epoch = eta - _EPOCH
    schedule_time = task.schedule_time
    schedule_time.seconds = since_epoch.days * 86400 + since_epoch.seconds
    schedule_time.nanos = since_epoch.microseconds * 1000
    if spec.name:
        current = settings()
        if not current.project:
            location_path()  # raises ConfigurationError
        queue = _queue_path(current.project, current.location, spec.queue)
        task.name = f"{queue}/tasks/{spec.name}"
    return _wrap_task(task)


#: Pauses before asking CreateTask again after an answer was lost: a connection that was
#: reset is often still in use for the next request (it fails too) until gRPC notices.
_SETTLE_DELAYS = (0.05, 0.25, 1.0)


def _create_settled(parent: str, task: tasks_v2.Task) -> tasks_v2.Task:
    """CreateTask; when it fails after the request may have reached Cloud Tasks (a reset
    connection, an internal error), again under the same name, a few times within
    ``cloud_tasks_timeout_seconds``. Cloud Tasks creates a name once, so a later answer settles
    the first: created, or ALREADY_EXISTS because an earlier attempt was (the task is there:
    created). A deadline is not retried (it would double the wait): EnqueueOutcomeUnknown."""
    timeout = settings().cloud_tasks_timeout_seconds
    deadline = time.monotonic() + timeout
    try:
        return client().create_task(parent=parent, task=task, timeout=timeout)
    except api_exceptions.DeadlineExceeded:
        raise
    except api_exceptions.GoogleAPIError as exc:
        if not _outcome.may_have_landed(exc):
            raise
        errors: list[api_exceptions.GoogleAPIError] = [exc]
    for delay in _SETTLE_DELAYS:
        if time.monotonic() + delay >= deadline:
            break
        time.sleep(delay)
        try:
            return client().create_task(
                parent=parent, task=task, timeout=max(0.001, deadline - time.monotonic())
            )
        except api_exceptions.AlreadyExists:
            logger.info("CreateTask of %s: an attempt whose answer was lost created it", task.name)
            return task
        except api_exceptions.GoogleAPIError as exc:
            errors.append(exc)
            if not (_outcome.may_have_landed(exc) or _transient(exc)):
                break
    raise EnqueueOutcomeUnknown(
        f"Cloud Tasks did not answer CreateTask ({'; '.join(map(str, errors))}): task "
        f"{short_name(task.name)} may or may not exist",
        task_name=short_name(task.name),
        queue=parent.rsplit("/", 1)[-1],
    ) from errors[-1]


def _transient(exc: api_exceptions.GoogleAPIError) -> bool:
    """Worth asking again (nothing was applied, but the next attempt may get through)."""
    return isinstance(exc, api_exceptions.ServiceUnavailable | api_exceptions.DeadlineExceeded)


def _queue_missing(exc: api_exceptions.GoogleAPIError) -> bool:
    # Cloud Tasks has answered a missing queue with NOT_FOUND and with FAILED_PRECONDITION
    # ("Queue does not exist"); any other precondition failure is a plain refusal.
    if isinstance(exc, api_exceptions.NotFound):
        return True
    return isinstance(exc, api_exceptions.FailedPrecondition) and "does not exist" in str(exc)


def create_task(spec: TaskSpec, body: bytes) -> tasks_v2.Task:
    """CreateTask, with Cloud Tasks' errors turned into gae_deferred's.

    ``InvalidArgument`` (e.g. "task too large") is raised as it is: defer() decides what a
    refusal means.
    """
    task = build_task(spec, body)
    parent = queue_path(spec.queue)
    try:
        if _sink is not None:
            return _sink.create_task(parent, task)
        return _create_settled(parent, task)
    except api_exceptions.AlreadyExists as exc:
        if _is_tombstone(task.name):
            raise TombstonedTaskError(
                f"task {spec.name!r} ran or was deleted recently in queue {spec.queue!r}: "
                "Cloud Tasks keeps its name for about an hour (up to 9 days for queues "
                "created from queue.yaml)"
            ) from exc
        raise TaskAlreadyExistsError(
            f"task {spec.name!r} already exists in queue {spec.queue!r}, or existed recently "
            "(Cloud Tasks keeps a name for about an hour after the task ran or was deleted, "
            "and up to 9 days for queues created from queue.yaml)"
        ) from exc
    except api_exceptions.InvalidArgument:
        raise
    except api_exceptions.DeadlineExceeded as exc:
        raise EnqueueOutcomeUnknown(
            f"Cloud Tasks did not answer within {settings().cloud_tasks_timeout_seconds}s: "
            f"task {spec.name or '(unnamed)'} may or may not exist",
            task_name=spec.name,
            queue=spec.queue,
        ) from exc
    except api_exceptions.GoogleAPIError as exc:
        if _queue_missing(exc):
            raise QueueNotFoundError(
                f"queue {spec.queue!r} does not exist: add it to queue.yaml and run "
                "`python -m gae_deferred.queues sync`"
            ) from exc
        raise EnqueueError(f"Cloud Tasks could not create the task: {exc}") from exc


def _is_tombstone(name: str) -> bool:
    """After ALREADY_EXISTS: True when no task of that name is there (it ran or was deleted:
    legacy's TombstonedTaskError); False when it is, or when that cannot be told."""
    try:
        if _sink is not None:
            return not _sink.has_task(name)
        client().get_task(name=name, timeout=settings().cloud_tasks_timeout_seconds)
    except api_exceptions.NotFound:
        return True
    except api_exceptions.GoogleAPIError:
        return False
    return False


# -- queues and tasks (the dashboard's calls; Google API errors are raised as they are) ----


def _timeout() -> float:
    return settings().cloud_tasks_timeout_seconds


def get_queue(queue: str) -> tasks_v2.Queue:
    return client().get_queue(name=queue_path(queue), timeout=_timeout())


def list_queues() -> Iterator[tasks_v2.Queue]:
    return iter(client().list_queues(parent=location_path(), timeout=_timeout()))


def pause_queue(queue: str) -> None:
    """Stop dispatching; tasks stay queued and can still be added."""
    client().pause_queue(name=queue_path(queue), timeout=_timeout())


def resume_queue(queue: str) -> None:
    client().resume_queue(name=queue_path(queue), timeout=_timeout())


def purge_queue(queue: str) -> None:
    """Delete every task of the queue."""
    client().purge_queue(name=queue_path(queue), timeout=_timeout())


def list_tasks_page(
    queue: str, *, page_size: int, page_token: str = "", full: bool = False
) -> tuple[list[tasks_v2.Task], str | None]:
    """One ListTasks page (BASIC view unless ``full``: no bodies) and the next page's token."""
    view = tasks_v2.Task.View.FULL if full else tasks_v2.Task.View.BASIC
    request = {
        "parent": queue_path(queue),
        "response_view": view,
        "page_size": page_size,
        "page_token": page_token,
    }
    response = client().list_tasks(request=request, timeout=_timeout())
    page = next(iter(response.pages), None)
    if page is None:
        return [], None
    return list(page.tasks), page.next_page_token or None


def get_task(queue: str, task: str, *, full: bool = False) -> tasks_v2.Task:
    view = tasks_v2.Task.View.FULL if full else tasks_v2.Task.View.BASIC
    return client().get_task(
        request={"name": task_path(queue, task), "response_view": view}, timeout=_timeout()
    )


def run_task(queue: str, task: str) -> None:
    """Dispatch a queued task now."""
    client().run_task(name=task_path(queue, task), timeout=_timeout())


def delete_task(queue: str, task: str) -> None:
    client().delete_task(name=task_path(queue, task), timeout=_timeout())
