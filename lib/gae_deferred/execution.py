"""Running a task: verify, load, call, and record what happened. Framework-free.

The webapp2 handler is a thin shell around :func:`execute_task`::

    task = TaskInfo.from_environ(environ)                # None: not from the task queue
    outcome = execute_task(body, task)
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
import uuid
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb

from . import (
    _ndb_rpc,
    cloud_tasks,
    enqueue,
    envelope,
    failures,
    legacy_pickles,
    metrics,
    refusals,
    spillover,
    task_backoff,
)
from ._config import settings
from ._datastore import in_namespace, ndb_context, patiently
from .cloud_tasks import TaskSpec
from .context import TaskInfo, running
from .errors import (
    DeferError,
    DuplicateDeliveryRunning,
    PayloadLoadError,
    PermanentTaskFailure,
    SingularTaskFailure,
    SpilledPayloadMissing,
    TaskAlreadyExistsError,
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
#: Retried by Cloud Tasks, recorded nowhere: the spilled payload is not visible yet.
UNAVAILABLE = 503


@dataclasses.dataclass(frozen=True, slots=True)
class TaskOutcome:
    """What the handler answers: HTTP status and a one-line reason for the response body."""

    status: int
    result: str
    message: str = ""


#: Every success answers the same: one instance, not one per task.
_SUCCEEDED = TaskOutcome(OK, "ok")


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
            payload_id, chunks = spillover.parse_ref(env.header)
            _, inner = spillover.load(payload_id, chunks, env.header["ref"].get("stored_bytes"))
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
    """Seconds since the task was first due (its ETA), or since the envelope was made."""
    since_ms = header.get("eta_ms", header.get("created_ms"))
    if isinstance(since_ms, bool) or not isinstance(since_ms, int):
        return None
    return max(0.0, time.time() - since_ms / 1000)


def _all_reached(
    retries: int, age: float | None, limit: Any, age_limit: Any, *, inclusive: bool
) -> bool:
    """Cloud Tasks (and queue.yaml) stop retrying once every limit that is set is reached:
    with both a retry count and an age limit, both must be reached."""
    reached = []
    if limit is not None:
        reached.append(retries >= limit if inclusive else retries > limit)
    if age_limit is not None:
        reached.append(age is not None and (age >= age_limit if inclusive else age > age_limit))
    return bool(reached) and all(reached)


def is_last_attempt(task: TaskInfo, header: dict[str, Any]) -> bool:
    """Whether this task is not retried if this attempt fails (a dead letter): its queue's
    queue.yaml limits are reached (Cloud Tasks drops it), or its own ``_retry_options`` are."""
    limit, age_limit = _queue_retry_limits(settings().queue_yaml).get(task.queue, (None, None))
    age = _age_seconds(header)
    if _all_reached(task.retry_count, age, limit, age_limit, inclusive=True):
        return True
    return is_last_by_task_options(task, header)


def is_last_by_task_options(task: TaskInfo, header: dict[str, Any]) -> bool:
    """Whether the task's own ``_retry_options`` allow no retry after this attempt.

    Legacy semantics (the SDK's taskqueue ``Retry.CanRetry``): retry number ``n`` is allowed
    while ``task_retry_limit >= n`` or ``task_age_limit`` is not yet exceeded (with both set,
    either suffices), so a limit of N gives N + 1 deliveries. Cloud Tasks knows nothing of
    them: the handler answers the last one 200 (see _execute).
    """
    retry = header.get("retry")
    if not retry:
        return False
    limit, age_limit = retry.get("task_retry_limit"), retry.get("task_age_limit")
    return _all_reached(task.retry_count, _age_seconds(header), limit, age_limit, inclusive=True)


def _over_task_limits(task: TaskInfo, header: dict[str, Any]) -> str | None:
    """A retry past the task's own ``_retry_options`` (a duplicate delivery of its last
    attempt, or a retry its queue made anyway): not run. A first attempt always runs."""
    retry = header.get("retry")
    if not retry or not task.retry_count:
        return None
    limit, age_limit = retry.get("task_retry_limit"), retry.get("task_age_limit")
    age = _age_seconds(header)
    if not _all_reached(task.retry_count, age, limit, age_limit, inclusive=False):
        return None
    reached = []
    if limit is not None:
        reached.append(f"retry limit {limit} reached ({task.retry_count} retries)")
    if age_limit is not None:
        reached.append(f"task age limit {age_limit}s exceeded")
    return " and ".join(reached)


#: A spilled payload missing for a reference younger than this may still be committing (its
#: writer's commit not yet visible): the task is retried rather than failed for good.
SPILL_VISIBILITY_GRACE_SECONDS = 60
#: Outcomes of a task whose function was not called: not counted in the metrics.
_NOT_RUN = frozenset({"duplicate", "superseded", "not-visible", "claimed"})


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
        """The failure record this task updates: its own, or the one a retrigger names in the
        signed envelope. Never a request header: those are not signed."""
        named = self.outer_failure_id
        return named or failures.failure_id(self.task.queue, self.task.name)

    outer_failure_id: str | None = None
    #: (payload id, token) of the claim this attempt may hold on its spilled payload (see
    #: spillover.claim): set before the claim's transaction, whose commit may land unanswered.
    claim: tuple[str, str] | None = None


def execute_task(body: bytes | bytearray, task: TaskInfo | None) -> TaskOutcome:
    """Run one task request and say what the handler must answer (docs/design.md's table).

    Nothing runs unless ``task`` carries the queue's task headers and ``body`` is an envelope
    signed with a known key. Everything defer() makes is bound to its task (name and queue), so
    a body replayed as another task is refused like a forged one; a reference to a spilled
    payload must always be bound. Only ``serialize()`` makes unbound envelopes, for apps that
    post them as tasks themselves, as legacy apps did: those run under any task name, and a
    replay of one runs that call again, as a duplicate delivery would.
    """
    if task is None:
        refusals.record("not-from-queue", None, "no task queue headers")
        return TaskOutcome(FORBIDDEN, "forbidden", "not a task queue request")
    try:
        outer = envelope.open_envelope(body, decompress=False)
    except UnverifiedEnvelope as exc:
        if legacy_pickles.is_legacy_pickle(body):
            return legacy_pickles.execute(body, task)
        logger.error("rejected task %s on %s: %s", task.name, task.queue, exc)
        signed = bytes(body[: len(envelope.MAGIC)]) == envelope.MAGIC
        refusals.record("bad-signature" if signed else "unsigned", task, str(exc))
        return TaskOutcome(FORBIDDEN, "forbidden", str(exc))
    header = outer.header
    bound = "task" in header or "queue" in header or outer.is_reference
    if bound and (header.get("task") != task.name or header.get("queue") != task.queue):
        message = (
            f"envelope was made for task {header.get('task')!r} on queue {header.get('queue')!r}"
            f", not {task.name!r} on {task.queue!r}: not executing it"
        )
        logger.error("rejected task %s on %s: %s", task.name, task.queue, message)
        refusals.record("wrong-task", task, message)
        return TaskOutcome(FORBIDDEN, "forbidden", message)
    failure_id = header.get("failure_id")
    task = task_backoff.counted(task, header)
    attempt = _Attempt(
        task=task,
        body=body,
        env=outer,
        outer_failure_id=failure_id if isinstance(failure_id, str) and failure_id else None,
    )
    started = time.perf_counter()
    with ndb_context():
        try:
            outcome = _execute(attempt, started)
        except Exception:
            # Datastore failed the attempt after its claim may have landed: without this the
            # claim would hold every redelivery off for task_deadline_seconds.
            _release_patiently(attempt)
            raise
    if outcome.result not in _NOT_RUN:
        metrics.observe_outcome(
            attempt.env.function,
            task.queue,
            time.perf_counter() - started,
            outcome.result,
            task.retry_count,
        )
    return outcome


def _execute(attempt: _Attempt, started: float) -> TaskOutcome:
    task = attempt.task
    try:
        if attempt.env.is_reference:
            superseded = _load_spilled(attempt)
            if superseded is not None:
                return superseded
        else:
            attempt.env = envelope.decompressed(attempt.env)
        over = _over_task_limits(task, attempt.header)
        if over:
            return _past_the_last_attempt(attempt, over)
        obj, args, kwargs = envelope.load_call(attempt.env)
        namespace = attempt.header.get("namespace")
        with running(task):
            if isinstance(namespace, str) and namespace:
                with in_namespace(namespace):
                    obj(*args, **kwargs)
            else:
                obj(*args, **kwargs)
    except DuplicateDeliveryRunning as exc:
        logger.info("task %s: duplicate delivery while the first runs: %s", task.name, exc)
        return TaskOutcome(UNAVAILABLE, "claimed", str(exc))
    except SingularTaskFailure as exc:
        if is_last_by_task_options(task, attempt.header):
            return _record(attempt, exc, FailureState.DEAD, status=OK)
        logger.debug("task %s asked to be retried", task.name)
        _release(attempt)
        return TaskOutcome(RETRY_QUIETLY, "retry", "SingularTaskFailure")
    except SpilledPayloadMissing as exc:
        return _missing(attempt, exc)
    except PayloadLoadError as exc:
        # Kept as a dead letter: the dashboard can retrigger it onto a version that loads it.
        logger.error("task %s cannot load here: %s", task.name, exc)
        return _record(attempt, exc, FailureState.DEAD)
    except PermanentTaskFailure as exc:
        logger.warning("task %s failed permanently: %s", task.name, exc)
        return _record(attempt, exc, FailureState.PERMANENT)
    except Exception as exc:
        logger.exception("task %s (%s) failed", task.name, attempt.header.get("function"))
        if is_last_by_task_options(task, attempt.header):
            # Cloud Tasks would retry it by its queue's settings: 200 ends it where legacy did.
            return _record(attempt, exc, FailureState.DEAD, status=OK)
        last = is_last_attempt(task, attempt.header)
        if not last and task_backoff.has_own_backoff(attempt.header) and _retry_later(attempt):
            return _record(attempt, exc, FailureState.RETRYING, status=OK)
        return _record(attempt, exc, FailureState.DEAD if last else FailureState.RETRYING)
    _succeeded(attempt)
    logger.info(
        "task %s ran %s in %.1f ms",
        task.name,
        attempt.header.get("function"),
        (time.perf_counter() - started) * 1000,
    )
    return _SUCCEEDED


def _load_spilled(attempt: _Attempt) -> TaskOutcome | None:
    """Read and verify the spilled payload; an outcome when this task must not run it."""
    payload_id, chunks = spillover.parse_ref(attempt.header)
    stored_bytes = attempt.header["ref"].get("stored_bytes")
    # The claim first: a duplicate delivery while this one runs stops here, before the
    # payload is read (DuplicateDeliveryRunning), and one after it finished finds no record.
    token = uuid.uuid4().hex
    attempt.claim = (payload_id, token)
    try:
        taken = spillover.claim(payload_id, attempt.task.name, token)
    except (DuplicateDeliveryRunning, SpilledPayloadMissing):
        attempt.claim = None  # answered: certainly not taken
        raise
    if taken is None:
        attempt.claim = None
        logger.warning(
            "task %s: payload %s belongs to another task now", attempt.task.name, payload_id
        )
        return TaskOutcome(OK, "superseded", "payload moved to another task")
    record, inner = spillover.load(payload_id, chunks, stored_bytes)
    if record.task_name and record.task_name != attempt.task.name:
        # A retrigger or the sweeper moved the payload to another task; that one runs it.
        logger.warning(
            "task %s: payload %s now belongs to task %s; not running it here",
            attempt.task.name,
            payload_id,
            record.task_name,
        )
        return TaskOutcome(OK, "superseded", f"payload moved to task {record.task_name}")
    attempt.record, attempt.body = record, inner
    attempt.env = envelope.open_envelope(inner)
    return None


def _release(attempt: _Attempt) -> None:
    """Give up this attempt's claim on its spilled payload: it ends without finishing the
    task, and the retry must not wait for the claim to run out."""
    if attempt.claim is not None:
        spillover.release(*attempt.claim, task_name=attempt.task.name)


def _release_patiently(attempt: _Attempt) -> None:
    """Give the claim up after a Datastore failure, retrying while Datastore comes back."""
    if attempt.claim is not None:
        patiently(
            functools.partial(_release, attempt),
            f"give up task {attempt.task.name}'s claim on payload {attempt.claim[0]}",
        )


def _missing(attempt: _Attempt, exc: SpilledPayloadMissing) -> TaskOutcome:
    """A reference whose payload is not in Datastore: already ran, not visible yet, or gone."""
    task = attempt.task
    if exc.already_ran:
        logger.info("task %s already ran (duplicate delivery): %s", task.name, exc)
        return TaskOutcome(OK, "duplicate", str(exc))
    ref_ms = (attempt.header.get("ref") or {}).get("at")
    young = isinstance(ref_ms, int) and time.time() - ref_ms / 1000 < SPILL_VISIBILITY_GRACE_SECONDS
    if young and not exc.record_found:
        logger.warning("task %s: %s; retrying, its commit may not be visible yet", task.name, exc)
        return TaskOutcome(UNAVAILABLE, "not-visible", str(exc))
    logger.warning("task %s failed permanently: %s", task.name, exc)
    return _record(attempt, exc, FailureState.PERMANENT)


def _succeeded(attempt: _Attempt) -> None:
    """Clean up after success: no Datastore RPC at all for an inline first attempt."""
    if attempt.record is not None:
        spillover.finish(attempt.record.key.id(), attempt.record.chunks)
    if attempt.task.retry_count or attempt.outer_failure_id:
        failures.resolve(attempt.failure_id)


def _retry_later(attempt: _Attempt) -> bool:
    """Create the next attempt of a task with its own backoff (see task_backoff), due after
    it; False if that cannot be done, and Cloud Tasks retries this one instead."""
    task = attempt.task
    name = task_backoff.next_name(task)
    when = task_backoff.due(task, attempt.header)
    record = attempt.record
    previous = record.task_name if record is not None else None
    try:
        if record is not None:
            # The payload moves to the next task; the record is written with the failure.
            record.task_name = name
            spec = enqueue.record_spec(record, eta=when)
            body = spillover.reference(
                record,
                failure_id=attempt.failure_id,
                **{task_backoff.RETRIED: task.retry_count + 1},
            )
        else:
            request = attempt.header.get(task_backoff.REQUEST) or {}
            spec = TaskSpec(
                queue=task.queue,
                url=request.get("url") or enqueue.task_url(attempt.env.function),
                headers=dict(request.get("headers") or {}),
                eta=when,
                name=name,
                routing=dict(request.get("routing") or {}),
            )
            body = task_backoff.inline_retry_body(
                attempt.body, name, attempt.failure_id, task.retry_count + 1
            )
        cloud_tasks.create_task(spec, body)
    except TaskAlreadyExistsError:
        logger.info("task %s: its retry %s exists already (a redelivery)", task.name, name)
    except (DeferError, api_exceptions.GoogleAPIError) as exc:
        logger.warning("task %s: could not schedule its retry %s (%s)", task.name, name, exc)
        if record is not None:
            record.task_name = previous
        return False
    return True


def _past_the_last_attempt(attempt: _Attempt, reason: str) -> TaskOutcome:
    """A delivery after the task's own last attempt: not run, and the failure record of that
    attempt (its real exception and traceback) is left as it is."""
    logger.warning("task %s not run: %s", attempt.task.name, reason)
    if failures.get(attempt.failure_id) is not None:
        _release(attempt)
        return TaskOutcome(OK, FailureState.DEAD, reason)
    return _record(attempt, PermanentTaskFailure(reason), FailureState.DEAD)


def _record(
    attempt: _Attempt, exc: BaseException, state: FailureState, status: int | None = None
) -> TaskOutcome:
    """Update the failure record (and the spilled record) after a failed attempt.

    ``state`` is retrying, permanent or dead; a spilled payload takes the same state.
    ``status`` overrides the answer (200: the task's own retry options end it here).
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
            claim=None,
            claimed_until=None,
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
    # Not ndb.put_multi: its debug string of a kept payload (up to 1 MiB) costs ~200 ms.
    _ndb_rpc.commit(upserts=[*entities, record, failures.group_entity(record)])
    if attempt.record is None:
        _release_patiently(attempt)  # a claim whose outcome was unknown (the record unread)
    # Retryable errors answer 500 even on the last attempt: Cloud Tasks then drops the task,
    # while a mismatch between queue.yaml and the real queue errs on the side of retrying.
    if status is None:
        status = OK if isinstance(exc, PermanentTaskFailure) else ERROR
    return TaskOutcome(status, state, f"{type(exc).__name__}: {exc}")


def _qualified_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
