"""The Cloud Tasks gateway: every call gae_deferred makes to Cloud Tasks goes through here.

Cloud Tasks' name rules, resource paths, the task description (:class:`TaskSpec`), CreateTask
and BatchCreateTasks with their errors turned into gae_deferred's, and the queue and task calls
of the dashboard (BatchDeleteTasks included), all with one timeout
(``settings().cloud_tasks_timeout_seconds``)::

    from gae_deferred import cloud_tasks

    spec = cloud_tasks.TaskSpec(queue="reports", url="/_ah/queue/deferred", headers={}, eta=now)
    cloud_tasks.create_task(spec, body)          # TaskAlreadyExistsError, QueueNotFoundError...
    cloud_tasks.create_tasks([(spec, body), ...], concurrency=32)  # [(task, None) | (None, error)]
    cloud_tasks.delete_tasks("reports", ["d-1f2e...", ...])        # [None | error]
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
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any, Protocol, TypeVar

import grpc
from google.api_core import exceptions as api_exceptions, retry as api_retry
from google.api_core.future import polling
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport
from google.protobuf import field_mask_pb2

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

#: Cloud Tasks' name rules: a task's own name, and a queue's.
TASK_NAME = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9-]{1,100}$")
T = TypeVar("T")
R = TypeVar("R")


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
    """Forget the cached client, so the next call reads CLOUD_TASKS_EMULATOR_HOST again (and
    whether the batch RPCs were refused: another endpoint may offer them)."""
    _cached_client.cache_clear()
    _refused_batches.clear()


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


@functools.lru_cache(maxsize=256)
def valid_queue(queue: str) -> bool:
    """Whether ``queue`` is a valid queue name (cached: a process uses a handful of queues)."""
    return QUEUE_NAME.match(queue) is not None


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
    current = settings()
    target = current.http_target
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
    except api_exceptions.InvalidArgument:
        raise
    except api_exceptions.GoogleAPIError as exc:
        raise _translated(spec, task.name, exc) from exc


def _translated(spec: TaskSpec, name: str, exc: api_exceptions.GoogleAPIError) -> Exception:
    """Cloud Tasks' error for one task as gae_deferred's (``InvalidArgument`` as it is)."""
    if isinstance(exc, api_exceptions.InvalidArgument):
        return exc
    if isinstance(exc, api_exceptions.AlreadyExists):
        if _is_tombstone(name):
            return TombstonedTaskError(
                f"task {spec.name!r} ran or was deleted recently in queue {spec.queue!r}: "
                "Cloud Tasks keeps its name for about an hour (up to 9 days for queues "
                "created from queue.yaml)"
            )
        return TaskAlreadyExistsError(
            f"task {spec.name!r} already exists in queue {spec.queue!r}, or existed recently "
            "(Cloud Tasks keeps a name for about an hour after the task ran or was deleted, "
            "and up to 9 days for queues created from queue.yaml)"
        )
    if isinstance(exc, api_exceptions.DeadlineExceeded):
        return EnqueueOutcomeUnknown(
            f"Cloud Tasks did not answer within {settings().cloud_tasks_timeout_seconds}s: "
            f"task {spec.name or '(unnamed)'} may or may not exist",
            task_name=spec.name,
            queue=spec.queue,
        )
    if _queue_missing(exc):
        return QueueNotFoundError(
            f"queue {spec.queue!r} does not exist: add it to queue.yaml and run "
            "`python -m gae_deferred.queues sync`"
        )
    return EnqueueError(f"Cloud Tasks could not create the task: {exc}")


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


# -- many tasks at once -----------------------------------------------------------------

#: BatchCreateTasks takes up to 100 tasks of one queue, BatchDeleteTasks up to 1,000.
BATCH_CREATE_MAX = 100
BATCH_DELETE_MAX = 1000
#: Bytes of tasks one BatchCreateTasks request carries at most. 100 tasks near the 100 KB
#: limit would make a request of about 10 MB; Google documents no limit on the request, and a
#: server or proxy that keeps gRPC's default refuses a message over 4 MiB, so the tasks are
#: sent in requests under that. The 64 KiB left hold what is not the tasks: each task's
#: CreateTaskRequest (its parent and framing, about 100 bytes) and the request's own fields.
BATCH_CREATE_BYTES = 4 * 1024 * 1024 - 64 * 1024
#: The batch RPCs Cloud Tasks refused in this process (UNIMPLEMENTED or PERMISSION_DENIED):
#: from the first refusal on, their tasks go one CreateTask (DeleteTask) call each.
_refused_batches: set[str] = set()
_refused_lock = threading.Lock()
#: How often to ask whether a batch's long-running operation is done (it usually is at once).
_POLLING = api_retry.Retry(
    predicate=polling.POLLING_PREDICATE, initial=0.02, maximum=0.5, multiplier=2.0
)

Outcome = tuple[Any, Exception | None]


def map_concurrently(
    function: Callable[[T], R], items: Sequence[T], concurrency: int
) -> list[tuple[R | None, Exception | None]]:
    """``function`` over ``items``, at most ``concurrency`` at a time, in the calling thread
    when that is 1: one (result, None) or (None, exception) per item, in order.

    A Cloud Tasks call is a network round trip that mostly waits, so threads overlap the
    waits; the gRPC client is thread-safe.
    """

    def attempt(item: T) -> tuple[R | None, Exception | None]:
        try:
            return function(item), None
        except Exception as exc:
            return None, exc

    if concurrency <= 1 or len(items) <= 1:
        return [attempt(item) for item in items]
    workers = min(concurrency, len(items))
    with futures.ThreadPoolExecutor(workers, thread_name_prefix="gae-deferred") as pool:
        return list(pool.map(attempt, items))


def _groups(
    queues: Sequence[str], sizes: Sequence[int], most: int, most_bytes: int
) -> list[list[int]]:
    """Indexes of ``queues`` grouped by queue, in order, in runs of at most ``most`` items and
    ``most_bytes`` of ``sizes`` together (an item bigger than that goes alone)."""
    by_queue: dict[str, list[int]] = {}
    for index, queue in enumerate(queues):
        by_queue.setdefault(queue, []).append(index)
    groups: list[list[int]] = []
    for indexes in by_queue.values():
        run: list[int] = []
        run_bytes = 0
        for index in indexes:
            if run and (len(run) == most or run_bytes + sizes[index] > most_bytes):
                groups.append(run)
                run, run_bytes = [], 0
            run.append(index)
            run_bytes += sizes[index]
        groups.append(run)
    return groups


def _refuse(rpc: str, exc: Exception) -> None:
    """Note (and log, once per process) that Cloud Tasks refused ``rpc``."""
    with _refused_lock:
        if rpc in _refused_batches:
            return
        _refused_batches.add(rpc)
    code = getattr(exc, "grpc_status_code", None)
    logger.warning(
        "Cloud Tasks answered %s with %s (%s): this process sends one call per task instead "
        "from now on (see docs/batch.md)",
        rpc,
        code.name if code is not None else type(exc).__name__,
        exc,
    )


def create_tasks(items: Sequence[tuple[TaskSpec, bytes]], concurrency: int = 1) -> list[Outcome]:
    """Create many tasks: ``BatchCreateTasks`` calls of up to 100 tasks of one queue and
    ``BATCH_CREATE_BYTES``, at most ``concurrency`` in flight. One ``(task, None)`` or
    ``(None, error)`` per item, in order, the error as create_task raises it (a name in use is
    ``TaskAlreadyExistsError`` for that task alone: the batch is not atomic).

    Where Cloud Tasks answers ``BatchCreateTasks`` with UNIMPLEMENTED or PERMISSION_DENIED,
    this process creates tasks one CreateTask call each from then on (``concurrency`` at a
    time), as it does under ``gae_deferred.testing.capture_tasks()``.
    """
    if _sink is not None or "BatchCreateTasks" in _refused_batches:
        return _create_each(items, concurrency)
    sizes = [_task_bytes(spec, body) for spec, body in items]
    queues = [spec.queue for spec, _ in items]
    groups = _groups(queues, sizes, BATCH_CREATE_MAX, BATCH_CREATE_BYTES)
    answers = map_concurrently(
        lambda group: _create_group([items[i] for i in group]), groups, concurrency
    )
    outcomes: list[Outcome] = [(None, None)] * len(items)
    refused: list[int] = []
    for group, (results, error) in zip(groups, answers, strict=True):
        if results is None and error is None:
            refused += group
            continue
        for position, index in enumerate(group):
            outcomes[index] = results[position] if results is not None else (None, error)
    if refused:
        # Refused groups are sent again together, so the fallback has the whole concurrency.
        again = _create_each([items[i] for i in refused], concurrency)
        for index, outcome in zip(refused, again, strict=True):
            outcomes[index] = outcome
    return outcomes


def _create_each(items: Sequence[tuple[TaskSpec, bytes]], concurrency: int) -> list[Outcome]:
    return map_concurrently(lambda item: create_task(*item), items, concurrency)


def _task_bytes(spec: TaskSpec, body: bytes) -> int:
    """What a task adds to a BatchCreateTasks request, at most: the task without its body, the
    body, and room for the body's field tag and the lengths it lengthens. Built without the
    body, so sizing a batch copies no payload."""
    return tasks_v2.Task.pb(build_task(spec, b"")).ByteSize() + len(body) + 16


def _create_group(items: Sequence[tuple[TaskSpec, bytes]]) -> list[Outcome] | None:
    """One BatchCreateTasks call (one CreateTask for a single task: no operation to poll);
    None when Cloud Tasks refuses the RPC (nothing was created)."""
    if "BatchCreateTasks" in _refused_batches:
        return None
    if len(items) == 1:
        return _create_each(items, 1)
    tasks = [build_task(spec, body) for spec, body in items]
    parent = queue_path(items[0][0].queue)
    requests = [tasks_v2.CreateTaskRequest(parent=parent, task=task) for task in tasks]
    try:
        operation = client().batch_create_tasks(
            parent=parent, requests=requests, timeout=_timeout()
        )
    except (api_exceptions.MethodNotImplemented, api_exceptions.PermissionDenied) as exc:
        _refuse("BatchCreateTasks", exc)
        return None
    except api_exceptions.GoogleAPIError as exc:
        if _outcome.may_have_landed(exc) or _transient(exc):
            return [_create_after_lost(spec, body) for spec, body in items]
        pairs = zip(items, tasks, strict=True)
        return [(None, _as_error(spec, task.name, exc)) for (spec, _), task in pairs]
    failed = _failed_requests(operation)
    if failed is None:
        # The operation failed as a whole or did not finish in time: some tasks may exist.
        return [_create_after_lost(spec, body) for spec, body in items]
    outcomes: list[Outcome] = []
    for index, ((spec, _), task) in enumerate(zip(items, tasks, strict=True)):
        status = failed.get(index)
        if status is None:
            outcomes.append((task, None))
        else:
            refusal = api_exceptions.from_grpc_status(status.code, status.message)
            outcomes.append((None, _as_error(spec, task.name, refusal)))
    return outcomes


def _failed_requests(operation: Any) -> dict[int, Any] | None:
    """The per-task refusals of a finished batch operation, by request index; None when the
    operation failed as a whole (no per-task answer) or its end could not be read in time."""
    try:
        operation.result(timeout=_timeout(), polling=_POLLING)
    except (futures.TimeoutError, api_exceptions.RetryError):
        return None
    except api_exceptions.GoogleAPICallError:
        pass  # the operation's own error (a batch whose every task failed), or a failed poll
    state = operation.operation
    if not state.done:
        return None
    metadata = operation.metadata
    failed = dict(metadata.failed_requests) if metadata is not None else {}
    if state.HasField("error") and not failed:
        return None
    return failed


def _as_error(spec: TaskSpec, name: str, exc: api_exceptions.GoogleAPIError) -> Exception:
    """create_task's error for one task of a batch, caused by Cloud Tasks' own."""
    error = _translated(spec, name, exc)
    if error is not exc:
        error.__cause__ = exc
    return error


def _create_after_lost(spec: TaskSpec, body: bytes) -> Outcome:
    """CreateTask for a task of a batch whose answer was lost: ALREADY_EXISTS means that batch
    created it, as for a lost CreateTask (``_create_settled``)."""
    try:
        return create_task(spec, body), None
    except TaskAlreadyExistsError:
        logger.info("CreateTask of %s: the batch whose answer was lost created it", spec.name)
        return build_task(spec, body), None
    except Exception as exc:
        return None, exc


def delete_tasks(queue: str, names: Sequence[str], concurrency: int = 1) -> list[Exception | None]:
    """Delete tasks of one queue by their own names: ``BatchDeleteTasks`` calls of up to 1,000
    (one DeleteTask each where Cloud Tasks refuses the batch RPC). One error (Google's, as
    delete_task raises it: NotFound for a task that is gone) or None per name, in order."""
    runs = [names[at : at + BATCH_DELETE_MAX] for at in range(0, len(names), BATCH_DELETE_MAX)]
    answers = map_concurrently(lambda run: _delete_run(queue, run), runs, concurrency)
    errors: list[Exception | None] = []
    for run, (results, error) in zip(runs, answers, strict=True):
        errors += results if results is not None else [error] * len(run)
    return errors


def _delete_each(queue: str, names: Sequence[str]) -> list[Exception | None]:
    return [error for _, error in map_concurrently(lambda n: delete_task(queue, n), names, 1)]


def _delete_run(queue: str, names: Sequence[str]) -> list[Exception | None]:
    if len(names) == 1 or "BatchDeleteTasks" in _refused_batches:
        return _delete_each(queue, names)
    try:
        operation = client().batch_delete_tasks(
            parent=queue_path(queue),
            names=[task_path(queue, name) for name in names],
            timeout=_timeout(),
        )
    except (api_exceptions.MethodNotImplemented, api_exceptions.PermissionDenied) as exc:
        _refuse("BatchDeleteTasks", exc)
        return _delete_each(queue, names)
    failed = _failed_requests(operation)
    if failed is None:
        # Deleting again is harmless: a task the lost batch deleted answers NotFound.
        return _delete_each(queue, names)
    return [
        None
        if index not in failed
        else api_exceptions.from_grpc_status(failed[index].code, failed[index].message)
        for index in range(len(names))
    ]


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


# -- queue.yaml sync (the queue CLI's calls: a location named on its command line, its own
# timeout, and retry=None so that a missing emulator or endpoint fails now rather than after
# the default retry budget) ---------------------------------------------------------------


def location_path_of(project: str, location: str) -> str:
    """``projects/P/locations/L`` for a project and location given explicitly."""
    return f"projects/{project}/locations/{location}"


def queues_in(parent: str, *, timeout: float) -> dict[str, tasks_v2.Queue]:
    """Every queue of the location ``parent``, by its short name."""
    pager = client().list_queues(parent=parent, retry=None, timeout=timeout)
    return {short_name(queue.name): queue for queue in pager}


def create_queue(parent: str, queue: tasks_v2.Queue, *, timeout: float) -> tasks_v2.Queue:
    """CreateQueue; a queue that should start paused (state PAUSED) is paused right after,
    as CreateQueue ignores the state it is given."""
    created = client().create_queue(parent=parent, queue=queue, retry=None, timeout=timeout)
    if queue.state == tasks_v2.Queue.State.PAUSED:
        client().pause_queue(name=created.name, retry=None, timeout=timeout)
    return created


def update_queue(queue: tasks_v2.Queue, fields: list[str], *, timeout: float) -> None:
    """UpdateQueue of ``fields`` (field-mask paths); a ``state`` among them pauses the queue,
    which UpdateQueue cannot do."""
    paths = [path for path in fields if path != "state"]
    if paths:
        client().update_queue(
            queue=queue,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            retry=None,
            timeout=timeout,
        )
    if "state" in fields:
        client().pause_queue(name=queue.name, retry=None, timeout=timeout)
