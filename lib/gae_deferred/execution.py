"""Running a task: verify, load, call, and record what happened. Framework-free.

The webapp2 handler is a thin shell around :func:`execute_task`::

    task = TaskInfo.from_headers(request.headers)       # None: not from the task queue
    outcome = execute_task(request.body, task)
    response.status = outcome.status

``run(data)`` keeps the legacy meaning: verify and call in-process, return the result.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import time
import traceback
from typing import Any

from google.cloud import ndb

from . import envelope, failures, metrics, spillover
from ._config import settings
from ._datastore import ndb_context
from .context import TaskInfo, running
from .errors import (
    PayloadLoadError,
    PermanentTaskFailure,
    SingularTaskFailure,
    UnverifiedEnvelope,
)
from .failures import FailureState
from .queue_config import QueueYamlError, load_queue_yaml
from .spillover import PayloadState

logger = logging.getLogger("gae_deferred")

OK = 200
FORBIDDEN = 403
#: Legacy deferred answered SingularTaskFailure with 408: retried, but not logged as an error.
RETRY_QUIETLY = 408
ERROR = 500


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """What the handler answers: HTTP status and a one-line reason for the response body."""

    status: int
    result: str
    message: str = ""


def set_log_level(level: int | str) -> None:
    """Legacy helper: the level of gae_deferred's log messages (``logging.DEBUG`` etc.)."""
    logger.setLevel(level)


def run(data: bytes) -> Any:
    """Legacy API: verify a serialized call, execute it and return its result.

    Spilled payloads are read from Datastore (inside an ndb context); inline ones need nothing.
    """
    env = envelope.open_envelope(data)
    if env.is_reference:
        with ndb_context():
            _, inner = spillover.load(env.header["ref"]["id"], env.header["ref"]["chunks"])
        env = envelope.open_envelope(inner)
    obj, args, kwargs = envelope.load_call(env)
    return obj(*args, **kwargs)


@functools.cache
def _queue_retry_limits(queue_yaml: str | None) -> dict[str, tuple[int | None, float | None]]:
    """Retry limits per queue, read once per process. main.py loads queue.yaml at start-up, so
    a broken file stops the app there; here it only costs the dead-letter detection."""
    if not queue_yaml:
        return {}
    try:
        queues = load_queue_yaml(queue_yaml)
    except (OSError, QueueYamlError) as exc:
        logger.error("cannot read retry limits from %s: %s", queue_yaml, exc)
        return {}
    return {
        name: (queue.retry.task_retry_limit, queue.retry.task_age_limit)
        for name, queue in queues.items()
    }


def _age_seconds(header: dict[str, Any]) -> float | None:
    created_ms = header.get("created_ms")
    return time.time() - created_ms / 1000 if isinstance(created_ms, int) else None


def is_last_attempt(task: TaskInfo, header: dict[str, Any]) -> bool:
    """Whether Cloud Tasks will drop this task if this attempt fails (a dead letter)."""
    limit, age_limit = _queue_retry_limits(settings().queue_yaml).get(task.queue, (None, None))
    retry = header.get("retry") or {}
    limit = retry.get("task_retry_limit", limit)
    age_limit = retry.get("task_age_limit", age_limit)
    if limit is not None and task.retry_count >= limit:
        return True
    age = _age_seconds(header)
    return bool(age_limit is not None and age is not None and age >= age_limit)


def _over_task_limits(task: TaskInfo, header: dict[str, Any]) -> str | None:
    """Per-task retry options (Cloud Tasks has none) are enforced here, before running."""
    retry = header.get("retry")
    if not retry:
        return None
    limit = retry.get("task_retry_limit")
    if limit is not None and task.retry_count > limit:
        return f"retry limit {limit} reached ({task.retry_count} retries)"
    age_limit = retry.get("task_age_limit")
    if age_limit is None:
        return None
    age = _age_seconds(header)
    if age is not None and age > age_limit:
        return f"task age limit {age_limit}s exceeded"
    return None


@dataclasses.dataclass
class _Attempt:
    """One execution of one task, and the state failure recording needs."""

    task: TaskInfo
    body: bytes | bytearray
    env: envelope.Envelope
    record: spillover.DeferredPayload | None = None

    @property
    def header(self) -> dict[str, Any]:
        return self.env.header

    @property
    def failure_id(self) -> str:
        return self.task.failure_id or failures.failure_id(self.task.queue, self.task.name)


def execute_task(body: bytes, task: TaskInfo | None) -> TaskOutcome:
    """Run one task request and say what the handler must answer (see DESIGN.md's table)."""
    if task is None:
        return TaskOutcome(FORBIDDEN, "forbidden", "not a task queue request")
    try:
        outer = envelope.open_envelope(body)
    except UnverifiedEnvelope as exc:
        logger.error("rejected task %s on %s: %s", task.name, task.queue, exc)
        return TaskOutcome(FORBIDDEN, "forbidden", str(exc))
    attempt = _Attempt(task=task, body=body, env=outer)
    started = time.perf_counter()
    with ndb_context():
        outcome = _execute(attempt)
    metrics.observe_outcome(
        attempt.env.function,
        task.queue,
        time.perf_counter() - started,
        outcome.result,
        task.retry_count,
    )
    return outcome


def _execute(attempt: _Attempt) -> TaskOutcome:
    task = attempt.task
    started = time.perf_counter()
    try:
        if attempt.env.is_reference:
            ref = attempt.env.header["ref"]
            attempt.record, inner = spillover.load(ref["id"], ref["chunks"])
            attempt.body = inner
            attempt.env = envelope.open_envelope(inner)
        over = _over_task_limits(task, attempt.header)
        if over:
            return _record(attempt, PermanentTaskFailure(over), FailureState.DEAD)
        obj, args, kwargs = envelope.load_call(attempt.env)
        with running(task):
            obj(*args, **kwargs)
    except SingularTaskFailure:
        logger.debug("task %s asked to be retried", task.name)
        return TaskOutcome(RETRY_QUIETLY, "retry", "SingularTaskFailure")
    except PayloadLoadError as exc:
        # Kept as a dead letter: the dashboard can retrigger it onto a version that loads it.
        logger.error("task %s cannot load here: %s", task.name, exc)
        return _record(attempt, exc, FailureState.DEAD)
    except PermanentTaskFailure as exc:
        logger.warning("task %s failed permanently: %s", task.name, exc)
        return _record(attempt, exc, FailureState.PERMANENT)
    except Exception as exc:
        logger.exception("task %s (%s) failed", task.name, attempt.header.get("function"))
        last = is_last_attempt(task, attempt.header)
        return _record(attempt, exc, FailureState.DEAD if last else FailureState.RETRYING)
    _succeeded(attempt)
    logger.info(
        "task %s ran %s in %.1f ms",
        task.name,
        attempt.header.get("function"),
        (time.perf_counter() - started) * 1000,
    )
    return TaskOutcome(OK, "ok")


def _succeeded(attempt: _Attempt) -> None:
    """Clean up after success: no Datastore RPC at all for an inline first attempt."""
    if attempt.record is not None:
        spillover.delete(attempt.record.key.id(), attempt.record.chunks)
    if attempt.task.retry_count or attempt.task.failure_id:
        failures.resolve(attempt.failure_id)


def _record(attempt: _Attempt, exc: BaseException, state: FailureState) -> TaskOutcome:
    """Update the failure record (and the spilled record) after a failed attempt.

    ``state`` is retrying, permanent or dead; a spilled payload takes the same state.
    """
    task = attempt.task
    now = datetime.datetime.now(datetime.UTC)
    record_id = attempt.failure_id
    existing = failures.get(record_id)
    header = attempt.header
    entities: list[ndb.Model] = []
    payload_id = None
    if attempt.record is not None:
        payload_id = attempt.record.key.id()
        attempt.record.populate(
            state=PayloadState(state.value),
            updated=now,
            attempts=(attempt.record.attempts or 0) + 1,
        )
        entities.append(attempt.record)
    elif existing is None:
        # The first failure keeps the inline payload; it is the same on every later attempt.
        entities.append(failures.kept_payload(record_id, attempt.body))
    record = failures.update(
        existing,
        record_id,
        function=str(header.get("function") or "?"),
        exception_type=_qualified_name(type(exc)),
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        state=state,
        task_name=task.name,
        queue=task.queue,
        meta=header or None,
        payload_id=payload_id or (existing.payload_id if existing else None),
        when=now,
    )
    ndb.put_multi([*entities, record, failures.group_entity(record)])
    # Retryable errors answer 500 even on the last attempt: Cloud Tasks then drops the task,
    # while a mismatch between queue.yaml and the real queue errs on the side of retrying.
    status = OK if isinstance(exc, PermanentTaskFailure) else ERROR
    return TaskOutcome(status, state, f"{type(exc).__name__}: {exc}")


def _qualified_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
