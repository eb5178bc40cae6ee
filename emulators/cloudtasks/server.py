"""In-process Cloud Tasks emulator: gRPC ``google.cloud.tasks.v2.CloudTasks`` + HTTP dispatch.

The real ``google-cloud-tasks`` client talks to it over an insecure channel::

    emu = CloudTasksEmulator(port=0, queue_yaml="queue.yaml", app_url="http://127.0.0.1:8080")
    emu.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{emu.port}")
    client = tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    ...
    emu.stop()

This module answers the RPCs; scheduler.py decides when each task is attempted and applies
the outcome, dispatch.py sends the HTTP request, operations.py keeps the batch RPCs'
long-running operations and store.py the SQLite state. One lock guards all state; RPCs only
touch memory and SQLite, while HTTP attempts run in a per-queue thread pool, so a slow app
never blocks an RPC.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any

import grpc
from google.cloud import tasks_v2
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2

from ... import defaults, queue_config
from ..errors import PortInUseError, RpcError, invalid
from . import http_delivery
from .oidc import OidcIssuer
from .operations import BatchKind, Operations
from .routing import ServiceRoutes
from .scheduler import (
    DEFAULT_ATTEMPTS,
    DEFAULT_CONCURRENT,
    HTTP_METHODS,
    QueueState,
    Scheduler,
    TaskState,
    duration_seconds,
    set_timestamp,
    timestamp_seconds,
)
from .store import Store

log = logging.getLogger("gae_deferred.local.cloudtasks")

SERVICE = "google.cloud.tasks.v2.CloudTasks"
OPERATIONS_SERVICE = "google.longrunning.Operations"
MAX_TASK_BYTES = 102400
MAX_BATCH_CREATE, MAX_BATCH_DELETE = 100, 1000
# A batch of MAX_BATCH_CREATE tasks of the largest size is ~10 MB, above gRPC's 4 MB default.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
TOMBSTONE_SECONDS = 3600.0
MAX_SCHEDULE_AHEAD = 30 * 86400.0
RPC_WORKERS = 16
LATENCY_RPC_WORKERS = 128
MIN_DEADLINE, MAX_DEADLINE = 15.0, 24 * 3600.0 + 15.0
# Cloud Tasks' defaults for fields left unspecified in CreateQueue/UpdateQueue.
DEFAULT_RATE = 500.0  # and scheduler.py's DEFAULT_CONCURRENT, DEFAULT_ATTEMPTS
DEFAULT_MIN_BACKOFF, DEFAULT_MAX_BACKOFF, DEFAULT_DOUBLINGS = 0.1, 3600.0, 16

QueuePb = tasks_v2.Queue.pb()
TaskPb = tasks_v2.Task.pb()
State = QueuePb.State
View = TaskPb.View
_CreateMeta = tasks_v2.BatchCreateTasksMetadata.pb()
_DeleteMeta = tasks_v2.BatchDeleteTasksMetadata.pb()
_BATCH_CREATE = BatchKind(
    _CreateMeta,
    lambda tasks: tasks_v2.BatchCreateTasksResponse.pb()(
        tasks=[tasks_v2.Task.pb(task) for task in tasks]
    ),
    _CreateMeta.State.SUCCEEDED,
    _CreateMeta.State.PARTIALLY_SUCCEEDED,
)
_BATCH_DELETE = BatchKind(
    _DeleteMeta,
    lambda _results: empty_pb2.Empty(),
    _DeleteMeta.State.SUCCEEDED,
    _DeleteMeta.State.PARTIALLY_SUCCEEDED,
)

_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,100}$")
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
_LOCATION_RE = re.compile(r"^projects/[A-Za-z0-9:.-]+/locations/[A-Za-z0-9-]+$")
_FORBIDDEN_HEADER = re.compile(r"^(host|x-google-.*|x-appengine-.*)$", re.IGNORECASE)
_QUEUE_MASK_PATHS = {
    "app_engine_routing_override",
    "http_target",
    "rate_limits",
    "rate_limits.max_dispatches_per_second",
    "rate_limits.max_burst_size",
    "rate_limits.max_concurrent_dispatches",
    "retry_config",
    "retry_config.max_attempts",
    "retry_config.max_retry_duration",
    "retry_config.min_backoff",
    "retry_config.max_backoff",
    "retry_config.max_doublings",
    "stackdriver_logging_config",
    "stackdriver_logging_config.sampling_ratio",
}


def _page(items: list, page_size: int, page_token: str, maximum: int) -> tuple[list, str]:
    if page_size < 0:
        raise invalid("page_size must not be negative")
    size = min(page_size or maximum, maximum)
    start = 0
    if page_token:
        if not page_token.startswith("o:") or not page_token[2:].isdigit():
            raise invalid(f"invalid page_token {page_token!r}")
        start = int(page_token[2:])
    end = start + size
    return items[start:end], (f"o:{end}" if end < len(items) else "")


def _checked_task(incoming: Any, issuer: OidcIssuer | None) -> Any:
    """A copy of a CreateTask request's task, validated, its output-only fields cleared."""
    task = TaskPb()
    task.CopyFrom(incoming)
    if task.HasField("http_request"):
        try:
            http_delivery.check(task.http_request, issuer)
        except ValueError as exc:
            raise invalid(str(exc)) from None
    else:
        _check_app_engine_request(task)
    if task.HasField("dispatch_deadline"):
        deadline = duration_seconds(task.dispatch_deadline)
        if deadline and not MIN_DEADLINE <= deadline <= MAX_DEADLINE:
            raise invalid("dispatch_deadline must be between 15s and 24h15s")
    for output_only in ("dispatch_count", "response_count", "first_attempt", "last_attempt"):
        task.ClearField(output_only)
    return task


def _check_app_engine_request(task: Any) -> None:
    if not task.HasField("app_engine_http_request"):
        raise invalid("task.app_engine_http_request is required")
    request_pb = task.app_engine_http_request
    if not request_pb.relative_uri:
        request_pb.relative_uri = "/"
    uri = request_pb.relative_uri
    if not uri.startswith("/") or " " in uri or len(uri) > 2083:
        raise invalid(f"invalid relative_uri {uri[:100]!r}: must start with '/', no spaces")
    if request_pb.http_method not in HTTP_METHODS:
        raise invalid(f"unknown http_method {request_pb.http_method}")
    if request_pb.body and HTTP_METHODS[request_pb.http_method] not in ("POST", "PUT"):
        raise invalid("a body is allowed only for POST and PUT tasks")
    for key in [key for key in request_pb.headers if _FORBIDDEN_HEADER.match(key)]:
        del request_pb.headers[key]
    size = len(request_pb.body) + len(uri.encode())
    size += sum(len(k.encode()) + len(v.encode()) for k, v in request_pb.headers.items())
    if size > MAX_TASK_BYTES:
        raise invalid(
            f"Task size too large: {size} bytes exceeds the maximum of {MAX_TASK_BYTES} bytes"
        )


def _check_batch_size(field: str, size: int, maximum: int, verb: str) -> None:
    if not size:
        raise invalid(f"{field} must not be empty")
    if size > maximum:
        raise invalid(f"at most {maximum} tasks can be {verb} in one batch, got {size}")


class CloudTasksEmulator:
    """A local Cloud Tasks service. See the module docstring and README.md."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        queue_yaml: str | os.PathLike[str] | None = "queue.yaml",
        project: str = "local-project",
        location: str = defaults.LOCATION,
        app_url: str = "http://127.0.0.1:8080",
        default_dispatch_deadline: float = 600.0,
        latency_ms: float = 0.0,
        services: Mapping[str, str] | None = None,
        oidc_port: int | None = None,
    ) -> None:
        if not (latency_ms >= 0 and math.isfinite(latency_ms)):
            raise ValueError(f"latency_ms must be a finite number >= 0, not {latency_ms!r}")
        self.host = host
        self._requested_port = port
        self.port = 0
        self.data_dir = data_dir
        self.queue_yaml = queue_yaml
        self.project = project
        self.location = location
        self.parent = f"projects/{project}/locations/{location}"
        self.app_url = app_url
        #: The app's other services (``service`` or ``version.service`` -> URL): a task goes to
        #: the one its App Engine routing names (see routing.py); app_url is the default one.
        self.services = dict(services or {})
        self.default_dispatch_deadline = default_dispatch_deadline
        #: Every RPC waits this long before it is handled, like a network round trip to the
        #: real service (benchmarks measure fan-out against it); RPCs wait in parallel.
        self.latency_ms = latency_ms
        #: HTTP-target tasks with an oidc_token: the issuer signing their tokens, serving its
        #: key on this port (0: any free one) from start(); None: such tasks are refused.
        self.oidc_port = oidc_port
        self.oidc: OidcIssuer | None = None
        self.rpc_counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.RLock()
        self._queues: dict[str, QueueState] = {}
        self._tasks: dict[str, TaskState] = {}
        self._tombstones: dict[str, float] = {}
        self._operations = Operations()
        self._store: Store | None = None
        self._server: grpc.Server | None = None
        self._scheduler = Scheduler(
            threading.Condition(self._lock),
            self._queues,
            self._tasks,
            ServiceRoutes(app_url, self.services),
            default_dispatch_deadline,
            forget=self._forget_task,
            persist=self._persist_task,
        )
        self.dispatch_log = self._scheduler.dispatch_log

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> CloudTasksEmulator:
        """Load state and queue.yaml, bind the port, start serving and dispatching.

        Raises QueueYamlError for an invalid queue.yaml and PortInUseError if the port
        cannot be bound.
        """
        if self.queue_yaml is not None:
            definitions = queue_config.load_queue_yaml(self.queue_yaml)
        else:
            definitions = {"default": queue_config.implicit_default_queue()}
        # Delayed RPCs sleep in their worker: more workers, so that the delay stays a round
        # trip and concurrent callers do not queue behind each other.
        workers = LATENCY_RPC_WORKERS if self.latency_ms else RPC_WORKERS
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ct-rpc"),
            # gRPC enables SO_REUSEPORT by default, which would let a second emulator
            # silently share the port instead of failing.
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ],
        )
        server.add_generic_rpc_handlers(self._handlers())
        try:
            port = server.add_insecure_port(f"{self.host}:{self._requested_port}")
        except RuntimeError as exc:
            raise PortInUseError(f"cannot bind {self.host}:{self._requested_port}: {exc}") from exc
        if port == 0:
            raise PortInUseError(f"cannot bind {self.host}:{self._requested_port}")
        self.port = port
        if self.oidc_port is not None:
            try:
                self.oidc = OidcIssuer(self.host, self.oidc_port, self.data_dir).start()
            except OSError as exc:
                server.stop(0)
                raise PortInUseError(f"cannot bind {self.host}:{self.oidc_port}: {exc}") from exc
            self._scheduler.oidc = self.oidc
        self._store = Store(self.data_dir)
        with self._lock:
            self._restore(definitions)
        self._server = server
        server.start()
        self._scheduler.start()
        return self

    def stop(self, grace: float = 0.5) -> None:
        """Stop serving and dispatching; attempts still running are abandoned."""
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.oidc is not None:
            self.oidc.stop()
        self._scheduler.stop()
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def __enter__(self) -> CloudTasksEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_counts(self) -> None:
        """Zero ``rpc_counts`` (a Counter of RPCs by method name)."""
        with self._lock:
            self.rpc_counts.clear()

    def _restore(self, definitions: dict[str, queue_config.QueueDefinition]) -> None:
        assert self._store is not None
        for _name, data in self._store.queues():
            self._install_queue(QueuePb.FromString(data))
        for definition in definitions.values():
            wanted = tasks_v2.Queue.pb(queue_config.to_cloud_tasks_queue(definition, self.parent))
            existing = self._queues.get(wanted.name)
            if existing is not None:
                if existing.pb.state == State.PAUSED:
                    wanted.state = State.PAUSED
                if existing.pb.HasField("purge_time"):
                    wanted.purge_time.CopyFrom(existing.pb.purge_time)
            self._install_queue(wanted)
            self._store.put_queue(wanted.name, wanted.SerializeToString())
        for name, queue_name, data, failures, previous, reason in self._store.tasks():
            if queue_name not in self._queues:
                continue
            task = TaskState(TaskPb.FromString(data), queue_name, failures, previous, reason)
            self._tasks[name] = task
            self._scheduler.push(self._queues[queue_name], task)
        self._tombstones = self._store.tombstones(time.time())

    def _install_queue(self, pb: Any) -> QueueState:
        existing = self._queues.get(pb.name)
        if existing is not None:
            self._scheduler.reconfigure(existing, pb)
            return existing
        queue = self._queues[pb.name] = self._scheduler.new_queue(pb)
        return queue

    # -- gRPC plumbing -----------------------------------------------------------------

    def _handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        t = tasks_v2
        empty = empty_pb2.Empty.SerializeToString
        operation = operations_pb2.Operation.SerializeToString
        # method -> (function of the raw request protobuf, request class, response serializer)
        tasks: dict[str, tuple[Callable, Any, Callable]] = {
            "CreateTask": (self._create_task, t.CreateTaskRequest.pb(), t.Task.serialize),
            "BatchCreateTasks": (
                self._batch_create_tasks,
                t.BatchCreateTasksRequest.pb(),
                operation,
            ),
            "GetTask": (self._get_task, t.GetTaskRequest.pb(), t.Task.serialize),
            "ListTasks": (
                self._list_tasks,
                t.ListTasksRequest.pb(),
                t.ListTasksResponse.serialize,
            ),
            "DeleteTask": (self._delete_task, t.DeleteTaskRequest.pb(), empty),
            "BatchDeleteTasks": (
                self._batch_delete_tasks,
                t.BatchDeleteTasksRequest.pb(),
                operation,
            ),
            "RunTask": (self._run_task, t.RunTaskRequest.pb(), t.Task.serialize),
            "CreateQueue": (self._create_queue, t.CreateQueueRequest.pb(), t.Queue.serialize),
            "GetQueue": (self._get_queue, t.GetQueueRequest.pb(), t.Queue.serialize),
            "ListQueues": (
                self._list_queues,
                t.ListQueuesRequest.pb(),
                t.ListQueuesResponse.serialize,
            ),
            "UpdateQueue": (self._update_queue, t.UpdateQueueRequest.pb(), t.Queue.serialize),
            "DeleteQueue": (self._delete_queue, t.DeleteQueueRequest.pb(), empty),
            "PauseQueue": (self._pause_queue, t.PauseQueueRequest.pb(), t.Queue.serialize),
            "ResumeQueue": (self._resume_queue, t.ResumeQueueRequest.pb(), t.Queue.serialize),
            "PurgeQueue": (self._purge_queue, t.PurgeQueueRequest.pb(), t.Queue.serialize),
        }
        operations: dict[str, tuple[Callable, Any, Callable]] = {
            "GetOperation": (self._get_operation, operations_pb2.GetOperationRequest, operation),
        }
        return (
            self._service(SERVICE, tasks),
            self._service(OPERATIONS_SERVICE, operations),
        )

    def _service(
        self, service: str, table: dict[str, tuple[Callable, Any, Callable]]
    ) -> grpc.GenericRpcHandler:
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                self._wrap(method, function),
                request_deserializer=request_type.FromString,
                response_serializer=serializer,
            )
            for method, (function, request_type, serializer) in table.items()
        }
        return grpc.method_handlers_generic_handler(service, handlers)

    def _wrap(self, method: str, function: Callable) -> Callable:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            if self.latency_ms:
                time.sleep(self.latency_ms / 1000)
            with self._lock:
                self.rpc_counts[method] += 1
            try:
                return function(request)
            except RpcError as exc:
                context.abort(exc.code, exc.message)
            except Exception as exc:
                log.exception("%s failed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"emulator error in {method}: {exc}")

        return handler

    # -- helpers -------------------------------------------------------------------------

    def _queue(self, name: str) -> QueueState:
        queue = self._queues.get(name)
        if queue is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Queue does not exist: {name}")
        return queue

    def _task(self, name: str) -> TaskState:
        task = self._tasks.get(name)
        if task is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Task does not exist: {name}")
        return task

    def _view(self, task: TaskState, view: int) -> tasks_v2.Task:
        copy = TaskPb()
        copy.CopyFrom(task.pb)
        if view != View.FULL:
            target = "http_request" if copy.HasField("http_request") else "app_engine_http_request"
            getattr(copy, target).ClearField("body")
            copy.view = View.BASIC
        else:
            copy.view = View.FULL
        return tasks_v2.Task.wrap(copy)

    def _queue_out(self, queue: QueueState) -> tasks_v2.Queue:
        copy = QueuePb()
        copy.CopyFrom(queue.pb)
        return tasks_v2.Queue.wrap(copy)

    def _persist_task(self, task: TaskState) -> None:
        assert self._store is not None
        self._store.put_task(
            task.pb.name,
            task.queue,
            task.pb.SerializeToString(),
            task.failures,
            task.previous_status,
            task.retry_reason,
        )

    def _forget_task(self, task: TaskState) -> None:
        """Delete a task and remember its name for an hour, like Cloud Tasks does."""
        assert self._store is not None
        until = time.time() + TOMBSTONE_SECONDS
        self._tasks.pop(task.pb.name, None)
        self._tombstones[task.pb.name] = until
        self._store.delete_task(task.pb.name, until)

    # -- tasks ---------------------------------------------------------------------------

    def _create_task(self, request: Any) -> tasks_v2.Task:
        task = _checked_task(request.task, self.oidc)
        with self._lock:
            return self._add_task(self._queue(request.parent), task, request.response_view)

    def _add_request(self, queue: QueueState, request: Any) -> tasks_v2.Task:
        return self._add_task(queue, _checked_task(request.task, self.oidc), request.response_view)

    def _add_task(self, queue: QueueState, task: Any, view: int) -> tasks_v2.Task:
        """Name (or dedup), store and schedule one checked task: CreateTask's and a batch's."""
        parent = queue.pb.name
        now = time.time()
        if task.name:
            prefix = f"{parent}/tasks/"
            if not task.name.startswith(prefix) or not _TASK_ID_RE.match(task.name[len(prefix) :]):
                raise invalid(
                    f"invalid task name {task.name!r}: expected {prefix}TASK_ID with letters, "
                    "digits, hyphens or underscores (at most 500)"
                )
            expires = self._tombstones.get(task.name, 0.0)
            if task.name in self._tasks or expires > now:
                raise RpcError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"Requested entity already exists: {task.name} (task names are reserved "
                    "for about an hour after the task is deleted or completed)",
                )
        else:
            task.name = f"{parent}/tasks/{secrets.randbelow(9 * 10**18) + 10**18}"
        scheduled = timestamp_seconds(task.schedule_time) if task.HasField("schedule_time") else 0.0
        if scheduled > now + MAX_SCHEDULE_AHEAD:
            raise invalid("schedule_time must be at most 30 days in the future")
        set_timestamp(task.schedule_time, max(scheduled, now))
        task.create_time.FromSeconds(int(now))
        state = TaskState(task, parent)
        self._tasks[task.name] = state
        self._persist_task(state)
        self._scheduler.push(queue, state)
        return self._view(state, view)

    def _batch_create_tasks(self, request: Any) -> operations_pb2.Operation:
        _check_batch_size("requests", len(request.requests), MAX_BATCH_CREATE, "created")
        for index, child in enumerate(request.requests):
            if child.parent != request.parent:
                raise invalid(
                    f"requests[{index}].parent {child.parent!r} differs from parent "
                    f"{request.parent!r}: all tasks of a batch go to the same queue"
                )
        with self._lock:
            queue = self._queue(request.parent)
            return self._operations.run(
                "BatchCreateTasks",
                request.parent,
                request.request_id,
                [functools.partial(self._add_request, queue, r) for r in request.requests],
                _BATCH_CREATE,
            )

    def _batch_delete_tasks(self, request: Any) -> operations_pb2.Operation:
        _check_batch_size("names", len(request.names), MAX_BATCH_DELETE, "deleted")
        with self._lock:
            self._queue(request.parent)
            return self._operations.run(
                "BatchDeleteTasks",
                request.parent,
                request.request_id,
                [functools.partial(self._delete_one, request.parent, n) for n in request.names],
                _BATCH_DELETE,
            )

    def _delete_one(self, parent: str, name: str) -> None:
        if name.rpartition("/tasks/")[0] != parent:
            raise invalid(f"task {name!r} is not in queue {parent!r}")
        self._forget_task(self._task(name))

    def _get_operation(self, request: Any) -> operations_pb2.Operation:
        with self._lock:
            operation = self._operations.get(request.name)
        if operation is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Operation does not exist: {request.name}")
        return operation

    def _get_task(self, request: Any) -> tasks_v2.Task:
        with self._lock:
            return self._view(self._task(request.name), request.response_view)

    def _list_tasks(self, request: Any) -> tasks_v2.ListTasksResponse:
        with self._lock:
            self._queue(request.parent)
            tasks = sorted(
                (task for task in self._tasks.values() if task.queue == request.parent),
                key=lambda task: (task.scheduled, task.pb.name),
            )
            page, token = _page(tasks, request.page_size, request.page_token, 1000)
            return tasks_v2.ListTasksResponse(
                tasks=[self._view(task, request.response_view) for task in page],
                next_page_token=token,
            )

    def _delete_task(self, request: Any) -> empty_pb2.Empty:
        with self._lock:
            self._forget_task(self._task(request.name))
        return empty_pb2.Empty()

    def _run_task(self, request: Any) -> tasks_v2.Task:
        with self._lock:
            task = self._task(request.name)
            queue = self._queue(task.queue)
            # RunTask dispatches even when the queue is paused, rate limited, or the task
            # is already running (CloudTasks.RunTask reference).
            self._scheduler.run_now(queue, task)
            return self._view(task, request.response_view)

    # -- queues --------------------------------------------------------------------------

    def _check_queue_config(self, pb: Any) -> None:
        rates, retry = pb.rate_limits, pb.retry_config
        if not 0 <= rates.max_dispatches_per_second <= 500:
            raise invalid("rate_limits.max_dispatches_per_second must be between 0 and 500")
        if not 0 <= rates.max_concurrent_dispatches <= 5000:
            raise invalid("rate_limits.max_concurrent_dispatches must be between 0 and 5000")
        if retry.max_attempts < -1:
            raise invalid("retry_config.max_attempts must be >= -1")
        if retry.max_doublings < 0:
            raise invalid("retry_config.max_doublings must not be negative")
        for path in ("max_retry_duration", "min_backoff", "max_backoff"):
            if duration_seconds(getattr(retry, path)) < 0:
                raise invalid(f"retry_config.{path} must not be negative")

    def _apply_defaults(self, pb: Any, had_retry: bool) -> None:
        rates, retry = pb.rate_limits, pb.retry_config
        if not rates.max_dispatches_per_second:
            rates.max_dispatches_per_second = DEFAULT_RATE
        if not rates.max_burst_size:
            rates.max_burst_size = min(500, max(1, math.ceil(rates.max_dispatches_per_second)))
        if not rates.max_concurrent_dispatches:
            rates.max_concurrent_dispatches = DEFAULT_CONCURRENT
        if not retry.max_attempts:
            retry.max_attempts = DEFAULT_ATTEMPTS
        if not retry.HasField("min_backoff"):
            retry.min_backoff.FromNanoseconds(int(DEFAULT_MIN_BACKOFF * 1e9))
        if not duration_seconds(retry.max_backoff):
            retry.max_backoff.FromSeconds(int(DEFAULT_MAX_BACKOFF))
        if not had_retry:
            retry.max_doublings = DEFAULT_DOUBLINGS
        if duration_seconds(retry.min_backoff) > duration_seconds(retry.max_backoff):
            raise invalid("retry_config.min_backoff must not exceed retry_config.max_backoff")

    def _check_queue_name(self, name: str, parent: str | None = None) -> None:
        location, _, queue_id = name.rpartition("/queues/")
        if not _LOCATION_RE.match(location) or not _ID_RE.match(queue_id):
            raise invalid(
                f"invalid queue name {name!r}: expected projects/P/locations/L/queues/ID "
                "(ID: letters, digits, hyphens, at most 100)"
            )
        if parent is not None and location != parent:
            raise invalid(f"queue name {name!r} is not under parent {parent!r}")

    def _create_queue(self, request: Any) -> tasks_v2.Queue:
        pb = QueuePb()
        pb.CopyFrom(request.queue)
        self._check_queue_name(pb.name, request.parent)
        self._check_queue_config(pb)
        had_retry = pb.HasField("retry_config")
        pb.ClearField("purge_time")
        pb.state = State.RUNNING
        self._apply_defaults(pb, had_retry)
        with self._lock:
            if pb.name in self._queues:
                raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"Queue already exists: {pb.name}")
            queue = self._install_queue(pb)
            self._save_queue(queue)
            return self._queue_out(queue)

    def _save_queue(self, queue: QueueState) -> None:
        assert self._store is not None
        self._store.put_queue(queue.pb.name, queue.pb.SerializeToString())
        self._scheduler.wake()

    def _get_queue(self, request: Any) -> tasks_v2.Queue:
        with self._lock:
            return self._queue_out(self._queue(request.name))

    def _list_queues(self, request: Any) -> tasks_v2.ListQueuesResponse:
        if not _LOCATION_RE.match(request.parent):
            raise invalid(f"invalid parent {request.parent!r}: expected projects/P/locations/L")
        wanted_state = None
        if request.filter:
            match = re.fullmatch(r"\s*state\s*[:=]\s*([A-Z_]+)\s*", request.filter)
            if match is None or match[1] not in State.keys():  # noqa: SIM118 (EnumTypeWrapper has no __contains__)
                raise invalid(f"unsupported filter {request.filter!r} (only 'state: STATE')")
            wanted_state = State.Value(match[1])
        with self._lock:
            queues = sorted(
                (
                    q
                    for name, q in self._queues.items()
                    if name.startswith(request.parent + "/queues/")
                    and (wanted_state is None or q.pb.state == wanted_state)
                ),
                key=lambda q: q.pb.name,
            )
            page, token = _page(queues, request.page_size, request.page_token, 9800)
            return tasks_v2.ListQueuesResponse(
                queues=[self._queue_out(q) for q in page], next_page_token=token
            )

    def _update_queue(self, request: Any) -> tasks_v2.Queue:
        incoming = request.queue
        self._check_queue_name(incoming.name)
        self._check_queue_config(incoming)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        for path in paths:
            if path not in _QUEUE_MASK_PATHS:
                raise invalid(f"update_mask path {path!r} cannot be updated")
        with self._lock:
            existing = self._queues.get(incoming.name)
            if existing is None:
                # UpdateQueue creates the queue when it does not exist (API reference).
                return self._create_queue(
                    tasks_v2.CreateQueueRequest.pb()(
                        parent=incoming.name.rpartition("/queues/")[0], queue=incoming
                    )
                )
            pb = QueuePb()
            pb.CopyFrom(existing.pb)
            if not paths:
                paths = [
                    "app_engine_routing_override",
                    "http_target",
                    "rate_limits",
                    "retry_config",
                    "stackdriver_logging_config",
                ]
            for path in paths:
                top, _, leaf = path.partition(".")
                if not leaf:
                    if incoming.HasField(top):
                        getattr(pb, top).CopyFrom(getattr(incoming, top))
                    else:
                        pb.ClearField(top)
                    continue
                source, target = getattr(incoming, top), getattr(pb, top)
                if source.DESCRIPTOR.fields_by_name[leaf].message_type is not None:
                    getattr(target, leaf).CopyFrom(getattr(source, leaf))
                else:
                    setattr(target, leaf, getattr(source, leaf))
            if any(path.startswith("rate_limits") for path in paths) and not any(
                path in ("rate_limits", "rate_limits.max_burst_size") for path in paths
            ):
                # max_burst_size is output only: re-derived when the rate changes.
                pb.rate_limits.max_burst_size = 0
            self._apply_defaults(pb, True)
            queue = self._install_queue(pb)
            self._save_queue(queue)
            return self._queue_out(queue)

    def _delete_queue(self, request: Any) -> empty_pb2.Empty:
        with self._lock:
            queue = self._queue(request.name)
            del self._queues[request.name]
            for name in [n for n, t in self._tasks.items() if t.queue == request.name]:
                del self._tasks[name]
            assert self._store is not None
            self._store.delete_queue(request.name)
            self._scheduler.close_queue(queue)
        return empty_pb2.Empty()

    def _set_state(self, name: str, state: int) -> tasks_v2.Queue:
        with self._lock:
            queue = self._queue(name)
            queue.pb.state = state
            self._save_queue(queue)
            return self._queue_out(queue)

    def _pause_queue(self, request: Any) -> tasks_v2.Queue:
        return self._set_state(request.name, State.PAUSED)

    def _resume_queue(self, request: Any) -> tasks_v2.Queue:
        return self._set_state(request.name, State.RUNNING)

    def _purge_queue(self, request: Any) -> tasks_v2.Queue:
        with self._lock:
            queue = self._queue(request.name)
            now = time.time()
            names = [n for n, t in self._tasks.items() if t.queue == request.name]
            for name in names:
                del self._tasks[name]
                self._tombstones[name] = now + TOMBSTONE_SECONDS
            self._scheduler.clear(queue)
            set_timestamp(queue.pb.purge_time, now)
            assert self._store is not None
            self._store.purge_queue(request.name, names, now + TOMBSTONE_SECONDS)
            self._save_queue(queue)
            return self._queue_out(queue)
