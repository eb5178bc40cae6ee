"""In-process Cloud Tasks emulator: gRPC ``google.cloud.tasks.v2.CloudTasks`` + HTTP dispatch.

The real ``google-cloud-tasks`` client talks to it over an insecure channel::

    emu = CloudTasksEmulator(port=0, queue_yaml="queue.yaml", app_url="http://127.0.0.1:8080")
    emu.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{emu.port}")
    client = tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    ...
    emu.stop()

One lock guards all state; RPCs only touch memory and SQLite, while HTTP attempts run in
a per-queue thread pool, so a slow app never blocks an RPC.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.cloud import tasks_v2
from google.protobuf import empty_pb2

from ... import queue_config
from . import dispatch, http_delivery
from .oidc import OidcIssuer
from .routing import ServiceRoutes, routing_of
from .store import Store

log = logging.getLogger("gae_deferred.local.cloudtasks")

SERVICE = "google.cloud.tasks.v2.CloudTasks"
MAX_TASK_BYTES = 102400
TOMBSTONE_SECONDS = 3600.0
MAX_SCHEDULE_AHEAD = 30 * 86400.0
POOL_CAP = 32
RPC_WORKERS = 16
LATENCY_RPC_WORKERS = 128
MIN_DEADLINE, MAX_DEADLINE = 15.0, 24 * 3600.0 + 15.0
# Cloud Tasks' defaults for fields left unspecified in CreateQueue/UpdateQueue.
DEFAULT_RATE, DEFAULT_CONCURRENT, DEFAULT_ATTEMPTS = 500.0, 1000, 100
DEFAULT_MIN_BACKOFF, DEFAULT_MAX_BACKOFF, DEFAULT_DOUBLINGS = 0.1, 3600.0, 16

QueuePb = tasks_v2.Queue.pb()
TaskPb = tasks_v2.Task.pb()
State = QueuePb.State
View = TaskPb.View

_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,100}$")
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
_LOCATION_RE = re.compile(r"^projects/[A-Za-z0-9:.-]+/locations/[A-Za-z0-9-]+$")
_METHODS = {
    0: "POST",
    1: "POST",
    2: "GET",
    3: "HEAD",
    4: "PUT",
    5: "DELETE",
    6: "PATCH",
    7: "OPTIONS",
}
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


class PortInUseError(OSError):
    """The requested gRPC port could not be bound."""


class RpcError(Exception):
    """Turned into a gRPC status by the handler wrapper."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _seconds(duration: Any) -> float:
    return duration.seconds + duration.nanos / 1e9


def _set_time(timestamp: Any, seconds: float) -> None:
    timestamp.FromNanoseconds(round(seconds * 1e6) * 1000)


def _time(timestamp: Any) -> float:
    return timestamp.ToNanoseconds() / 1e9


@dataclass
class _Queue:
    pb: Any
    tokens: float
    last_refill: float
    pool: futures.ThreadPoolExecutor
    inflight: int = 0
    heap: list[tuple[float, int, str]] = field(default_factory=list)


@dataclass
class _Task:
    pb: Any
    queue: str
    failures: int = 0
    previous_status: int | None = None
    retry_reason: str | None = None
    inflight: int = 0

    @property
    def scheduled(self) -> float:
        return _time(self.pb.schedule_time)


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _page(items: list, page_size: int, page_token: str, maximum: int) -> tuple[list, str]:
    if page_size < 0:
        raise _invalid("page_size must not be negative")
    size = min(page_size or maximum, maximum)
    start = 0
    if page_token:
        if not page_token.startswith("o:") or not page_token[2:].isdigit():
            raise _invalid(f"invalid page_token {page_token!r}")
        start = int(page_token[2:])
    end = start + size
    return items[start:end], (f"o:{end}" if end < len(items) else "")


class CloudTasksEmulator:
    """A local Cloud Tasks service. See the module docstring and README.md."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        queue_yaml: str | os.PathLike[str] | None = "queue.yaml",
        project: str = "local-project",
        location: str = "us-central1",
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
        self.dispatch_log: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, _Queue] = {}
        self._tasks: dict[str, _Task] = {}
        self._tombstones: dict[str, float] = {}
        self._seq = itertools.count()
        self._store: Store | None = None
        self._server: grpc.Server | None = None
        self._scheduler: threading.Thread | None = None
        self._stopping = False

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
            options=[("grpc.so_reuseport", 0)],
        )
        server.add_generic_rpc_handlers((self._handlers(),))
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
        self._store = Store(self.data_dir)
        with self._lock:
            self._restore(definitions)
        self._server = server
        server.start()
        self._scheduler = threading.Thread(
            target=self._schedule_loop, name="ct-scheduler", daemon=True
        )
        self._scheduler.start()
        return self

    def stop(self, grace: float = 0.5) -> None:
        """Stop serving and dispatching; attempts still running are abandoned."""
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.oidc is not None:
            self.oidc.stop()
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
            pools = [queue.pool for queue in self._queues.values()]
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
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
            task = _Task(TaskPb.FromString(data), queue_name, failures, previous, reason)
            self._tasks[name] = task
            self._push(self._queues[queue_name], task)
        self._tombstones = self._store.tombstones(time.time())

    def _install_queue(self, pb: Any) -> _Queue:
        existing = self._queues.get(pb.name)
        workers = max(1, min(pb.rate_limits.max_concurrent_dispatches or POOL_CAP, POOL_CAP))
        if existing is not None:
            old_workers = existing.pool._max_workers
            existing.pb = pb
            existing.tokens = min(existing.tokens, self._burst(pb))
            if old_workers != workers:
                existing.pool.shutdown(wait=False)
                existing.pool = self._new_pool(pb, workers)
            return existing
        queue = _Queue(pb, self._burst(pb), time.monotonic(), self._new_pool(pb, workers))
        self._queues[pb.name] = queue
        return queue

    @staticmethod
    def _new_pool(pb: Any, workers: int) -> futures.ThreadPoolExecutor:
        return futures.ThreadPoolExecutor(workers, thread_name_prefix=f"ct-{_short(pb.name)}")

    @staticmethod
    def _burst(pb: Any) -> float:
        return float(max(1, pb.rate_limits.max_burst_size))

    # -- gRPC plumbing -----------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        t = tasks_v2
        table: dict[str, tuple[Callable, Any, Callable]] = {
            "CreateTask": (self._create_task, t.CreateTaskRequest, t.Task.serialize),
            "GetTask": (self._get_task, t.GetTaskRequest, t.Task.serialize),
            "ListTasks": (self._list_tasks, t.ListTasksRequest, t.ListTasksResponse.serialize),
            "DeleteTask": (
                self._delete_task,
                t.DeleteTaskRequest,
                empty_pb2.Empty.SerializeToString,
            ),
            "RunTask": (self._run_task, t.RunTaskRequest, t.Task.serialize),
            "CreateQueue": (self._create_queue, t.CreateQueueRequest, t.Queue.serialize),
            "GetQueue": (self._get_queue, t.GetQueueRequest, t.Queue.serialize),
            "ListQueues": (self._list_queues, t.ListQueuesRequest, t.ListQueuesResponse.serialize),
            "UpdateQueue": (self._update_queue, t.UpdateQueueRequest, t.Queue.serialize),
            "DeleteQueue": (
                self._delete_queue,
                t.DeleteQueueRequest,
                empty_pb2.Empty.SerializeToString,
            ),
            "PauseQueue": (self._pause_queue, t.PauseQueueRequest, t.Queue.serialize),
            "ResumeQueue": (self._resume_queue, t.ResumeQueueRequest, t.Queue.serialize),
            "PurgeQueue": (self._purge_queue, t.PurgeQueueRequest, t.Queue.serialize),
        }
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                self._wrap(method, function, request_type),
                request_deserializer=request_type.deserialize,
                response_serializer=serializer,
            )
            for method, (function, request_type, serializer) in table.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _wrap(self, method: str, function: Callable, request_type: Any) -> Callable:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            if self.latency_ms:
                time.sleep(self.latency_ms / 1000)
            with self._lock:
                self.rpc_counts[method] += 1
            try:
                return function(request_type.pb(request))
            except RpcError as exc:
                context.abort(exc.code, exc.message)
            except Exception as exc:
                log.exception("%s failed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"emulator error in {method}: {exc}")

        return handler

    # -- helpers -------------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Queue does not exist: {name}")
        return queue

    def _task(self, name: str) -> _Task:
        task = self._tasks.get(name)
        if task is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Task does not exist: {name}")
        return task

    def _view(self, task: _Task, view: int) -> tasks_v2.Task:
        copy = TaskPb()
        copy.CopyFrom(task.pb)
        if view != View.FULL:
            target = "http_request" if copy.HasField("http_request") else "app_engine_http_request"
            getattr(copy, target).ClearField("body")
            copy.view = View.BASIC
        else:
            copy.view = View.FULL
        return tasks_v2.Task.wrap(copy)

    def _queue_out(self, queue: _Queue) -> tasks_v2.Queue:
        copy = QueuePb()
        copy.CopyFrom(queue.pb)
        return tasks_v2.Queue.wrap(copy)

    def _persist_task(self, task: _Task) -> None:
        assert self._store is not None
        self._store.put_task(
            task.pb.name,
            task.queue,
            task.pb.SerializeToString(),
            task.failures,
            task.previous_status,
            task.retry_reason,
        )

    def _forget_task(self, task: _Task) -> None:
        """Delete a task and remember its name for an hour, like Cloud Tasks does."""
        assert self._store is not None
        until = time.time() + TOMBSTONE_SECONDS
        self._tasks.pop(task.pb.name, None)
        self._tombstones[task.pb.name] = until
        self._store.delete_task(task.pb.name, until)

    def _push(self, queue: _Queue, task: _Task) -> None:
        heapq.heappush(queue.heap, (task.scheduled, next(self._seq), task.pb.name))
        self._wake.notify_all()

    # -- tasks ---------------------------------------------------------------------------

    def _create_task(self, request: Any) -> tasks_v2.Task:
        parent = request.parent
        task = TaskPb()
        task.CopyFrom(request.task)
        if task.HasField("http_request"):
            try:
                http_delivery.check(task.http_request, self.oidc)
            except ValueError as exc:
                raise _invalid(str(exc)) from None
        else:
            self._check_app_engine_request(task)
        if task.HasField("dispatch_deadline"):
            deadline = _seconds(task.dispatch_deadline)
            if deadline and not MIN_DEADLINE <= deadline <= MAX_DEADLINE:
                raise _invalid("dispatch_deadline must be between 15s and 24h15s")
        for output_only in ("dispatch_count", "response_count", "first_attempt", "last_attempt"):
            task.ClearField(output_only)
        now = time.time()
        with self._lock:
            queue = self._queue(parent)
            if task.name:
                prefix = f"{parent}/tasks/"
                if not task.name.startswith(prefix) or not _TASK_ID_RE.match(
                    task.name[len(prefix) :]
                ):
                    raise _invalid(
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
            scheduled = _time(task.schedule_time) if task.HasField("schedule_time") else 0.0
            if scheduled > now + MAX_SCHEDULE_AHEAD:
                raise _invalid("schedule_time must be at most 30 days in the future")
            _set_time(task.schedule_time, max(scheduled, now))
            task.create_time.FromSeconds(int(now))
            state = _Task(task, parent)
            self._tasks[task.name] = state
            self._persist_task(state)
            self._push(queue, state)
            return self._view(state, request.response_view)

    def _check_app_engine_request(self, task: Any) -> None:
        if not task.HasField("app_engine_http_request"):
            raise _invalid("task.app_engine_http_request is required")
        request_pb = task.app_engine_http_request
        if not request_pb.relative_uri:
            request_pb.relative_uri = "/"
        uri = request_pb.relative_uri
        if not uri.startswith("/") or " " in uri or len(uri) > 2083:
            raise _invalid(f"invalid relative_uri {uri[:100]!r}: must start with '/', no spaces")
        if request_pb.http_method not in _METHODS:
            raise _invalid(f"unknown http_method {request_pb.http_method}")
        if request_pb.body and _METHODS[request_pb.http_method] not in ("POST", "PUT"):
            raise _invalid("a body is allowed only for POST and PUT tasks")
        for key in [key for key in request_pb.headers if _FORBIDDEN_HEADER.match(key)]:
            del request_pb.headers[key]
        size = len(request_pb.body) + len(uri.encode())
        size += sum(len(k.encode()) + len(v.encode()) for k, v in request_pb.headers.items())
        if size > MAX_TASK_BYTES:
            raise _invalid(
                f"Task size too large: {size} bytes exceeds the maximum of {MAX_TASK_BYTES} bytes"
            )

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
            self._begin_attempt(queue, task, time.time(), forced=True)
            return self._view(task, request.response_view)

    # -- queues --------------------------------------------------------------------------

    def _check_queue_config(self, pb: Any) -> None:
        rates, retry = pb.rate_limits, pb.retry_config
        if not 0 <= rates.max_dispatches_per_second <= 500:
            raise _invalid("rate_limits.max_dispatches_per_second must be between 0 and 500")
        if not 0 <= rates.max_concurrent_dispatches <= 5000:
            raise _invalid("rate_limits.max_concurrent_dispatches must be between 0 and 5000")
        if retry.max_attempts < -1:
            raise _invalid("retry_config.max_attempts must be >= -1")
        if retry.max_doublings < 0:
            raise _invalid("retry_config.max_doublings must not be negative")
        for path in ("max_retry_duration", "min_backoff", "max_backoff"):
            if _seconds(getattr(retry, path)) < 0:
                raise _invalid(f"retry_config.{path} must not be negative")

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
        if not _seconds(retry.max_backoff):
            retry.max_backoff.FromSeconds(int(DEFAULT_MAX_BACKOFF))
        if not had_retry:
            retry.max_doublings = DEFAULT_DOUBLINGS
        if _seconds(retry.min_backoff) > _seconds(retry.max_backoff):
            raise _invalid("retry_config.min_backoff must not exceed retry_config.max_backoff")

    def _check_queue_name(self, name: str, parent: str | None = None) -> None:
        location, _, queue_id = name.rpartition("/queues/")
        if not _LOCATION_RE.match(location) or not _ID_RE.match(queue_id):
            raise _invalid(
                f"invalid queue name {name!r}: expected projects/P/locations/L/queues/ID "
                "(ID: letters, digits, hyphens, at most 100)"
            )
        if parent is not None and location != parent:
            raise _invalid(f"queue name {name!r} is not under parent {parent!r}")

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

    def _save_queue(self, queue: _Queue) -> None:
        assert self._store is not None
        self._store.put_queue(queue.pb.name, queue.pb.SerializeToString())
        self._wake.notify_all()

    def _get_queue(self, request: Any) -> tasks_v2.Queue:
        with self._lock:
            return self._queue_out(self._queue(request.name))

    def _list_queues(self, request: Any) -> tasks_v2.ListQueuesResponse:
        if not _LOCATION_RE.match(request.parent):
            raise _invalid(f"invalid parent {request.parent!r}: expected projects/P/locations/L")
        wanted_state = None
        if request.filter:
            match = re.fullmatch(r"\s*state\s*[:=]\s*([A-Z_]+)\s*", request.filter)
            if match is None or match[1] not in State.keys():  # noqa: SIM118 (EnumTypeWrapper has no __contains__)
                raise _invalid(f"unsupported filter {request.filter!r} (only 'state: STATE')")
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
                raise _invalid(f"update_mask path {path!r} cannot be updated")
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
            queue.pool.shutdown(wait=False, cancel_futures=True)
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
            queue.heap.clear()
            _set_time(queue.pb.purge_time, now)
            assert self._store is not None
            self._store.purge_queue(request.name, names, now + TOMBSTONE_SECONDS)
            self._save_queue(queue)
            return self._queue_out(queue)

    # -- dispatch ------------------------------------------------------------------------

    def _schedule_loop(self) -> None:
        with self._wake:
            while not self._stopping:
                wait = 1.0
                now, mono = time.time(), time.monotonic()
                for queue in list(self._queues.values()):
                    delay = self._dispatch_due(queue, now, mono)
                    if delay is not None:
                        wait = min(wait, delay)
                self._wake.wait(timeout=max(wait, 0.001))

    def _dispatch_due(self, queue: _Queue, now: float, mono: float) -> float | None:
        """Start every attempt the queue allows now; returns seconds until the next chance."""
        rates = queue.pb.rate_limits
        rate = rates.max_dispatches_per_second
        queue.tokens = min(self._burst(queue.pb), queue.tokens + (mono - queue.last_refill) * rate)
        queue.last_refill = mono
        if queue.pb.state != State.RUNNING or rate <= 0:
            return None
        limit = rates.max_concurrent_dispatches or DEFAULT_CONCURRENT
        while queue.heap:
            scheduled, _, name = queue.heap[0]
            task = self._tasks.get(name)
            if (
                task is None
                or task.inflight
                or task.queue != queue.pb.name
                or task.scheduled != scheduled
            ):
                heapq.heappop(queue.heap)
                continue
            if scheduled > now:
                return scheduled - now
            if queue.inflight >= limit:
                return None
            if queue.tokens < 1:
                return (1 - queue.tokens) / rate
            heapq.heappop(queue.heap)
            queue.tokens -= 1
            self._begin_attempt(queue, task, now, forced=False)
        return None

    def _begin_attempt(self, queue: _Queue, task: _Task, now: float, forced: bool) -> None:
        pb = task.pb
        if pb.HasField("http_request"):
            url, method, uri, headers, body = http_delivery.delivery(
                pb, _short(queue.pb.name), task, self.oidc
            )
        else:
            url, method, uri, headers, body = self._app_engine_delivery(queue, task)
        pb.dispatch_count += 1
        pb.last_attempt.Clear()
        pb.last_attempt.schedule_time.CopyFrom(pb.schedule_time)
        _set_time(pb.last_attempt.dispatch_time, now)
        if not pb.HasField("first_attempt"):
            _set_time(pb.first_attempt.dispatch_time, now)
        task.inflight += 1
        queue.inflight += 1
        # Written with the attempt's outcome (_finish), not here as well: a success deletes the
        # task and a failure stores it, counters included. A second SQLite commit per dispatch,
        # under the lock the scheduler holds, was a quarter of the emulator's CPU per task; all
        # a crash mid-attempt loses is that attempt's counters (the task is redelivered).
        deadline = _seconds(pb.dispatch_deadline) or self.default_dispatch_deadline
        queue.pool.submit(
            self._attempt, url, queue, pb.name, method, uri, headers, body, deadline, forced
        )

    def _app_engine_delivery(
        self, queue: _Queue, task: _Task
    ) -> tuple[str, str, str, dict[str, str], bytes]:
        """(service URL, method, relative URI, headers, body) of an App Engine task's attempt."""
        pb = task.pb
        request = pb.app_engine_http_request
        headers = dict(request.headers)
        user_agent = next((v for k, v in headers.items() if k.lower() == "user-agent"), None)
        headers = {k: v for k, v in headers.items() if k.lower() != "user-agent"}
        headers["User-Agent"] = (
            f"{user_agent} {dispatch.USER_AGENT}" if user_agent else dispatch.USER_AGENT
        )
        if request.body and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/octet-stream"
        headers.update(dispatch.task_headers("X-AppEngine-", _short(queue.pb.name), task))
        url, note = ServiceRoutes(self.app_url, self.services).resolve(*routing_of(queue.pb, pb))
        if note:
            log.warning("task %s: %s", _short(pb.name), note)
        method = _METHODS[request.http_method]
        return url, method, request.relative_uri or "/", headers, bytes(request.body)

    def _attempt(
        self,
        url: str,
        queue: _Queue,
        name: str,
        method: str,
        uri: str,
        headers: dict[str, str],
        body: bytes,
        deadline: float,
        forced: bool,
    ) -> None:
        result = dispatch.send(url, method, uri, headers, body, deadline)
        with self._wake:
            if self._stopping:
                return
            self._finish(queue, name, result, headers, forced)
            self._wake.notify_all()

    def _finish(
        self,
        queue: _Queue,
        name: str,
        result: dispatch.AttemptResult,
        headers: dict[str, str],
        forced: bool,
    ) -> None:
        now = time.time()
        queue.inflight -= 1
        self.dispatch_log.append(
            {
                "task": _short(name),
                "name": name,
                "queue": _short(queue.pb.name),
                "status": result.status,
                "error": result.error,
                "time": now,
                "retry_count": int(
                    headers.get("X-AppEngine-TaskRetryCount")
                    or headers["X-CloudTasks-TaskRetryCount"]
                ),
                "forced": forced,
            }
        )
        if len(self.dispatch_log) > 20000:
            del self.dispatch_log[:10000]
        task = self._tasks.get(name)
        if task is None or self._queues.get(task.queue) is not queue:
            return  # deleted or purged while the attempt was running
        task.inflight -= 1
        pb = task.pb
        if result.status is not None:
            pb.response_count += 1
        _set_time(pb.last_attempt.response_time, now)
        pb.last_attempt.response_status.code = result.rpc_code
        pb.last_attempt.response_status.message = result.reason
        if result.succeeded:
            self._forget_task(task)
            return
        task.failures += 1
        task.previous_status = result.status
        task.retry_reason = result.reason
        retry = pb.retry_config if pb.HasField("retry_config") else queue.pb.retry_config
        first = _time(pb.first_attempt.dispatch_time)
        max_attempts = retry.max_attempts or DEFAULT_ATTEMPTS
        if dispatch.retries_exhausted(
            task.failures, max_attempts, _seconds(retry.max_retry_duration), now - first
        ):
            log.info("task %s dropped after %d failed attempts", name, task.failures)
            self._forget_task(task)
            return
        delay = dispatch.backoff_seconds(
            task.failures - 1,
            _seconds(retry.min_backoff),
            _seconds(retry.max_backoff),
            retry.max_doublings,
        )
        _set_time(pb.schedule_time, now + delay)
        self._persist_task(task)
        self._push(queue, task)
