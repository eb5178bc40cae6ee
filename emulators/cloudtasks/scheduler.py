"""When the Cloud Tasks emulator attempts each task, and what an attempt's outcome does.

server.py answers the RPCs and owns the queues and tasks; it hands each queue and each task
due to run to a Scheduler. One thread starts every attempt a queue allows now (its
schedule_time come, the queue running, a token in its bucket of max_dispatches_per_second,
fewer than max_concurrent_dispatches in flight), each in the queue's thread pool through
dispatch.send. The outcome is applied under the emulator's lock: 2xx forgets the task;
anything else records it and schedules the retry (RetryConfig's backoff), or drops the task
once its retries are exhausted::

    scheduler = Scheduler(wake, queues, tasks, routes, 600.0, forget=..., persist=...)
    queue = scheduler.new_queue(queue_pb)
    scheduler.push(queue, task)  # attempted from task.scheduled on
    scheduler.start()
    scheduler.stop()

``wake`` is the emulator's condition on its one lock: every method but start and stop is
called with it held, and the scheduler waits on it between rounds.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from google.cloud import tasks_v2

from . import dispatch, http_delivery
from .oidc import OidcIssuer
from .routing import ServiceRoutes, routing_of

log = logging.getLogger("gae_deferred.local.cloudtasks")

#: At most this many worker threads per queue (max_concurrent_dispatches above it is capped).
POOL_CAP = 32
# Cloud Tasks' defaults for max_concurrent_dispatches and max_attempts left unspecified.
DEFAULT_CONCURRENT, DEFAULT_ATTEMPTS = 1000, 100
#: HttpMethod enum value -> the HTTP method a task is sent with (unspecified = POST).
HTTP_METHODS = {
    0: "POST",
    1: "POST",
    2: "GET",
    3: "HEAD",
    4: "PUT",
    5: "DELETE",
    6: "PATCH",
    7: "OPTIONS",
}
_RUNNING = tasks_v2.Queue.pb().State.RUNNING
_LOG_CAP = 20000


def duration_seconds(duration: Any) -> float:
    """A protobuf Duration in seconds."""
    return duration.seconds + duration.nanos / 1e9


def set_timestamp(timestamp: Any, seconds: float) -> None:
    """Set a protobuf Timestamp to epoch ``seconds``, to the microsecond."""
    timestamp.FromNanoseconds(round(seconds * 1e6) * 1000)


def timestamp_seconds(timestamp: Any) -> float:
    """A protobuf Timestamp in epoch seconds."""
    return timestamp.ToNanoseconds() / 1e9


def short_name(name: str) -> str:
    """The last part of a resource name (a queue's or a task's id)."""
    return name.rsplit("/", 1)[-1]


@dataclass
class QueueState:
    """A queue: its Queue protobuf and its dispatch state (token bucket, pool, due heap)."""

    pb: Any
    tokens: float
    last_refill: float
    pool: futures.ThreadPoolExecutor
    inflight: int = 0
    heap: list[tuple[float, int, str]] = field(default_factory=list)


@dataclass
class TaskState:
    """A task: its Task protobuf, the queue it is in, and what its attempts left behind."""

    pb: Any
    queue: str
    failures: int = 0
    previous_status: int | None = None
    retry_reason: str | None = None
    inflight: int = 0

    @property
    def scheduled(self) -> float:
        return timestamp_seconds(self.pb.schedule_time)


class Scheduler:
    """Attempts the tasks of the queues it is given; see the module docstring."""

    def __init__(
        self,
        wake: threading.Condition,
        queues: Mapping[str, QueueState],
        tasks: Mapping[str, TaskState],
        routes: ServiceRoutes,
        default_deadline: float,
        *,
        forget: Callable[[TaskState], None],
        persist: Callable[[TaskState], None],
    ) -> None:
        self._wake = wake
        self._queues = queues
        self._tasks = tasks
        self._routes = routes
        self._default_deadline = default_deadline
        # A finished task is forgotten (deleted, its name tombstoned), a retried one stored
        # again: both are the emulator's bookkeeping.
        self._forget = forget
        self._persist = persist
        #: One dict per finished attempt (see README.md), the oldest dropped beyond 20,000.
        self.dispatch_log: list[dict[str, Any]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: Signs the tokens of HTTP-target tasks (set by the emulator once it serves its keys).
        self.oidc: OidcIssuer | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._schedule_loop, name="ct-scheduler", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop dispatching; attempts still running are abandoned (their outcome is ignored)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
            pools = [queue.pool for queue in self._queues.values()]
        if self._thread is not None:
            self._thread.join(timeout=5)
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def new_queue(self, pb: Any) -> QueueState:
        """The dispatch state of a new queue: a full bucket and its pool."""
        return QueueState(pb, _burst(pb), time.monotonic(), _new_pool(pb))

    def reconfigure(self, queue: QueueState, pb: Any) -> None:
        """Apply a queue's new configuration (a pool of the new size if that changed)."""
        queue.pb = pb
        queue.tokens = min(queue.tokens, _burst(pb))
        if queue.pool._max_workers != _workers(pb):
            queue.pool.shutdown(wait=False)
            queue.pool = _new_pool(pb)

    def close_queue(self, queue: QueueState) -> None:
        """A deleted queue: its attempts not yet started never start."""
        queue.pool.shutdown(wait=False, cancel_futures=True)

    def push(self, queue: QueueState, task: TaskState) -> None:
        """Attempt ``task`` once its schedule_time has come."""
        heapq.heappush(queue.heap, (task.scheduled, next(self._seq), task.pb.name))
        self._wake.notify_all()

    def clear(self, queue: QueueState) -> None:
        """Forget every pending attempt of a purged queue."""
        queue.heap.clear()

    def wake(self) -> None:
        """Look again now (a queue was resumed, paused or changed its rate)."""
        self._wake.notify_all()

    def run_now(self, queue: QueueState, task: TaskState) -> None:
        """RunTask: attempt now, whatever the queue's state, rate and the task's attempts."""
        self._begin_attempt(queue, task, time.time(), forced=True)

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

    def _dispatch_due(self, queue: QueueState, now: float, mono: float) -> float | None:
        """Start every attempt the queue allows now; returns seconds until the next chance."""
        rates = queue.pb.rate_limits
        rate = rates.max_dispatches_per_second
        queue.tokens = min(_burst(queue.pb), queue.tokens + (mono - queue.last_refill) * rate)
        queue.last_refill = mono
        if queue.pb.state != _RUNNING or rate <= 0:
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

    def _begin_attempt(self, queue: QueueState, task: TaskState, now: float, forced: bool) -> None:
        pb = task.pb
        if pb.HasField("http_request"):
            url, method, uri, headers, body = http_delivery.delivery(
                pb, short_name(queue.pb.name), task, self.oidc
            )
        else:
            url, method, uri, headers, body = self._app_engine_delivery(queue, task)
        pb.dispatch_count += 1
        pb.last_attempt.Clear()
        pb.last_attempt.schedule_time.CopyFrom(pb.schedule_time)
        set_timestamp(pb.last_attempt.dispatch_time, now)
        if not pb.HasField("first_attempt"):
            set_timestamp(pb.first_attempt.dispatch_time, now)
        task.inflight += 1
        queue.inflight += 1
        # Written with the attempt's outcome (_finish), not here as well: a success deletes the
        # task and a failure stores it, counters included. A second SQLite commit per dispatch,
        # under the lock the scheduler holds, was a quarter of the emulator's CPU per task; all
        # a crash mid-attempt loses is that attempt's counters (the task is redelivered).
        deadline = duration_seconds(pb.dispatch_deadline) or self._default_deadline
        attempt = queue.pool.submit(
            self._attempt, url, queue, pb.name, method, uri, headers, body, deadline, forced
        )
        attempt.add_done_callback(_report_crash)

    def _app_engine_delivery(
        self, queue: QueueState, task: TaskState
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
        headers.update(dispatch.task_headers("X-AppEngine-", short_name(queue.pb.name), task))
        url, note = self._routes.resolve(*routing_of(queue.pb, pb))
        if note:
            log.warning("task %s: %s", short_name(pb.name), note)
        method = HTTP_METHODS[request.http_method]
        return url, method, request.relative_uri or "/", headers, bytes(request.body)

    def _attempt(
        self,
        url: str,
        queue: QueueState,
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
        queue: QueueState,
        name: str,
        result: dispatch.AttemptResult,
        headers: dict[str, str],
        forced: bool,
    ) -> None:
        now = time.time()
        queue.inflight -= 1
        self.dispatch_log.append(
            {
                "task": short_name(name),
                "name": name,
                "queue": short_name(queue.pb.name),
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
        if len(self.dispatch_log) > _LOG_CAP:
            del self.dispatch_log[: _LOG_CAP // 2]
        task = self._tasks.get(name)
        if task is None or self._queues.get(task.queue) is not queue:
            return  # deleted or purged while the attempt was running
        task.inflight -= 1
        pb = task.pb
        if result.status is not None:
            pb.response_count += 1
        set_timestamp(pb.last_attempt.response_time, now)
        pb.last_attempt.response_status.code = result.rpc_code
        pb.last_attempt.response_status.message = result.reason
        if result.succeeded:
            self._forget(task)
            return
        task.failures += 1
        task.previous_status = result.status
        task.retry_reason = result.reason
        retry = pb.retry_config if pb.HasField("retry_config") else queue.pb.retry_config
        first = timestamp_seconds(pb.first_attempt.dispatch_time)
        max_attempts = retry.max_attempts or DEFAULT_ATTEMPTS
        if dispatch.retries_exhausted(
            task.failures, max_attempts, duration_seconds(retry.max_retry_duration), now - first
        ):
            log.info("task %s dropped after %d failed attempts", name, task.failures)
            self._forget(task)
            return
        delay = dispatch.backoff_seconds(
            task.failures - 1,
            duration_seconds(retry.min_backoff),
            duration_seconds(retry.max_backoff),
            retry.max_doublings,
        )
        set_timestamp(pb.schedule_time, now + delay)
        self._persist(task)
        self.push(queue, task)


def _report_crash(attempt: futures.Future[None]) -> None:
    # The pool would keep an attempt's exception to itself, and its task would stay in flight
    # for good: say so.
    if not attempt.cancelled() and attempt.exception() is not None:
        log.error("dispatch attempt crashed", exc_info=attempt.exception())


def _burst(pb: Any) -> float:
    return float(max(1, pb.rate_limits.max_burst_size))


def _workers(pb: Any) -> int:
    return max(1, min(pb.rate_limits.max_concurrent_dispatches or POOL_CAP, POOL_CAP))


def _new_pool(pb: Any) -> futures.ThreadPoolExecutor:
    return futures.ThreadPoolExecutor(_workers(pb), thread_name_prefix=f"ct-{short_name(pb.name)}")
