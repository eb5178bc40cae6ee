"""defer(): turn a call into a Cloud Tasks App Engine task, spilling big payloads to Datastore.

from gae_deferred import defer

defer(report.build, account_id, _queue="reports", _countdown=30)
defer(lambda: cleanup(tmp_path))                 # closures work: cloudpickle
defer(index_all, big_list)                       # > 100 KB: spilled, the task carries a reference

@ndb.transactional()
def pay(order):
    order.put()
    defer(send_receipt, order.key.id(), _transactional=True)   # only if the transaction commits
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb, tasks_v2

from . import envelope, spillover, tracing
from ._config import settings
from ._datastore import ndb_context
from .cloud_tasks import TaskSpec, create_task, short_name, task_path
from .errors import (
    DatastoreUnavailableError,
    DeferError,
    EnqueueError,
    EnqueueOutcomeUnknown,
    TaskAlreadyExistsError,
)

logger = logging.getLogger("gae_deferred")

TASK_NAME = re.compile(r"^[A-Za-z0-9_-]{1,500}$")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9-]{1,100}$")
_URL_UNSAFE = re.compile(r"[^A-Za-z0-9_.]+")
_RETRY_FIELDS = (
    "task_retry_limit",
    "task_age_limit",
    "min_backoff_seconds",
    "max_backoff_seconds",
    "max_doublings",
)
_CONTENT_TYPE = {"Content-Type": "application/octet-stream"}


@dataclasses.dataclass(frozen=True)
class DeferredTask:
    """What defer() created. ``name`` is the short task name; ``path`` the full resource name."""

    name: str
    path: str
    queue: str
    eta: datetime.datetime
    function: str
    spilled: bool
    payload_bytes: int
    task_bytes: int
    stored_bytes: int = 0
    chunks: int = 0
    payload_id: str | None = None
    transactional: bool = False


def defer(
    obj: Callable,
    *args: Any,
    _countdown: float | None = None,
    _eta: datetime.datetime | None = None,
    _name: str | None = None,
    _queue: str | None = None,
    _url: str | None = None,
    _headers: Mapping[str, str] | None = None,
    _target: str | None = None,
    _service: str | None = None,
    _version: str | None = None,
    _instance: str | None = None,
    _retry_options: Any = None,
    _transactional: bool = False,
    **kwargs: Any,
) -> DeferredTask:
    """Run ``obj(*args, **kwargs)`` later in a task; returns a description of the task.

    Options keep the legacy meaning: ``_countdown`` seconds or an ``_eta`` datetime, a task
    ``_name`` (a duplicate raises TaskAlreadyExistsError), ``_queue``, ``_url``, extra
    ``_headers``, ``_target`` ("service" or "version.service") or ``_service``/``_version``/
    ``_instance`` routing, ``_retry_options`` (task_retry_limit and task_age_limit are enforced
    per task by the handler; Cloud Tasks applies backoffs per queue), and ``_transactional`` to
    enqueue only if the surrounding ndb transaction commits.
    """
    spec = _task_spec(
        obj,
        _countdown,
        _eta,
        _name,
        _queue,
        _url,
        _headers,
        _routing(_target, _service, _version, _instance),
    )
    extra = tracing.envelope_fields()
    retry = _retry_dict(_retry_options)
    if retry:
        extra["retry"] = retry
    data, header = envelope.build_with_header(obj, args, kwargs, **extra)
    if _transactional:
        return _defer_transactional(data, header, spec)
    if spec.size(data) <= settings().spill_threshold:
        try:
            return _create_inline(data, header, spec)
        except api_exceptions.InvalidArgument as exc:
            if "too large" not in str(exc).lower():
                raise EnqueueError(f"Cloud Tasks refused the task: {exc.message}") from exc
            logger.info("Cloud Tasks says %s is too large; spilling it", header["function"])
    return _defer_spilled(data, header, spec)


def _routing(
    target: str | None, service: str | None, version: str | None, instance: str | None
) -> dict[str, str]:
    routing: dict[str, str] = {}
    if target:
        # Legacy targets read "service" or "version.service".
        parts = target.split(".")
        if len(parts) > 2 or not all(parts):
            raise DeferError(f"_target {target!r} must be 'service' or 'version.service'")
        routing["service"] = parts[-1]
        if len(parts) == 2:
            routing["version"] = parts[0]
    for field, value in (("service", service), ("version", version), ("instance", instance)):
        if value:
            routing[field] = value
    return routing


def _retry_dict(options: Any) -> dict[str, float]:
    if options is None:
        return {}
    if isinstance(options, Mapping):
        source = options
        unknown = set(source) - set(_RETRY_FIELDS)
        if unknown:
            raise DeferError(f"_retry_options has unknown field(s): {', '.join(sorted(unknown))}")
    else:  # the legacy TaskRetryOptions object, or anything with the same attributes
        source = {field: getattr(options, field, None) for field in _RETRY_FIELDS}
    retry = {}
    for field in _RETRY_FIELDS:
        value = source.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise DeferError(f"_retry_options.{field} must be a number >= 0, not {value!r}")
        retry[field] = value
    return retry


def _task_spec(
    obj: Callable,
    countdown: float | None,
    eta: datetime.datetime | None,
    name: str | None,
    queue: str | None,
    url: str | None,
    headers: Mapping[str, str] | None,
    routing: dict[str, str],
) -> TaskSpec:
    current = settings()
    queue = queue or current.default_queue
    if not isinstance(queue, str) or not QUEUE_NAME.match(queue):
        raise DeferError(f"_queue {queue!r} is not a valid queue name (letters, digits, hyphens)")
    if name is not None and (not isinstance(name, str) or not TASK_NAME.match(name)):
        raise DeferError(
            f"_name {name!r} is not a valid task name (1-500 letters, digits, '_' or '-')"
        )
    if countdown is not None and eta is not None:
        raise DeferError("pass _countdown or _eta, not both")
    now = spillover.now()
    if countdown is not None:
        if isinstance(countdown, bool) or not isinstance(countdown, int | float) or countdown < 0:
            raise DeferError(f"_countdown must be a number of seconds >= 0, not {countdown!r}")
        when = now + datetime.timedelta(seconds=countdown)
    elif eta is not None:
        if not isinstance(eta, datetime.datetime):
            raise DeferError(f"_eta must be a datetime, not {type(eta).__name__}")
        when = eta if eta.tzinfo else eta.replace(tzinfo=datetime.UTC)
    else:
        when = now
    extra_headers = dict(headers or {})
    for key, value in extra_headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise DeferError(f"_headers must map str to str; got {key!r}: {value!r}")
        if key.lower().startswith("x-appengine-") or key.lower().startswith("x-cloudtasks-"):
            raise DeferError(f"_headers may not set {key}: Cloud Tasks sets it")
    if url is None:
        url = task_url(envelope.function_name(obj))
    elif not isinstance(url, str) or not url.startswith("/"):
        raise DeferError(f"_url must be a path starting with '/', not {url!r}")
    return TaskSpec(
        queue=queue,
        url=url,
        headers={**_CONTENT_TYPE, **tracing.task_headers(), **extra_headers},
        eta=when,
        name=name,
        routing=routing,
    )


def task_url(function: str) -> str:
    """The default task URL: the handler's path plus the function name, so logs show what ran."""
    return f"{settings().task_url}/{_URL_UNSAFE.sub('_', function)}"


def _create_inline(data: bytes, header: dict[str, Any], spec: TaskSpec) -> DeferredTask:
    created = create_task(spec, data)
    return DeferredTask(
        name=short_name(created.name),
        path=created.name,
        queue=spec.queue,
        eta=spec.eta,
        function=header["function"],
        spilled=False,
        payload_bytes=header["raw_bytes"],
        task_bytes=len(data),
    )


def _spill(
    data: bytes, header: dict[str, Any], spec: TaskSpec, *, transactional: bool
) -> tuple[TaskSpec, spillover.DeferredPayload, list[spillover.DeferredPayloadChunk]]:
    """The record and chunks for a payload, and its task spec.

    Spilled tasks are always named (after the record unless the caller named them), so the
    sweeper can re-create exactly this task.
    """
    payload_id = spillover.new_payload_id()
    spec = dataclasses.replace(spec, name=spec.name or f"d-{payload_id}")
    record, chunks = spillover.build_record(
        payload_id,
        data,
        header,
        queue=spec.queue,
        task_name=spec.name or "",
        eta=spec.eta,
        task=spec.to_json(),
        transactional=transactional,
    )
    return spec, record, chunks


def _reference(record: spillover.DeferredPayload) -> bytes:
    return envelope.build_reference(
        record.meta or {},
        {"id": record.key.id(), "chunks": record.chunks, "stored_bytes": record.stored_bytes},
    )


def _described(record: spillover.DeferredPayload, spec: TaskSpec, task_bytes: int) -> DeferredTask:
    return DeferredTask(
        name=spec.name or "",
        path=task_path(spec.queue, spec.name or ""),
        queue=spec.queue,
        eta=spec.eta,
        function=record.function,
        spilled=True,
        payload_bytes=record.payload_bytes,
        task_bytes=task_bytes,
        stored_bytes=record.stored_bytes,
        chunks=record.chunks,
        payload_id=record.key.id(),
        transactional=record.transactional,
    )


def _defer_spilled(data: bytes, header: dict[str, Any], spec: TaskSpec) -> DeferredTask:
    # Inside the context: ndb builds keys (of the record and its chunks) from the client's project.
    with ndb_context():
        spec, record, chunks = _spill(data, header, spec, transactional=False)
        payload_id = record.key.id()
        reference = _reference(record)
        try:
            spillover.write(record, chunks)
        except api_exceptions.GoogleAPIError as exc:
            raise DatastoreUnavailableError(
                f"could not store the {len(data):,} byte payload of {header['function']}: {exc}"
            ) from exc
        try:
            create_task(spec, reference)
        except EnqueueOutcomeUnknown as exc:
            # The task may exist: keep the payload; the sweeper creates the task if it does not.
            raise EnqueueOutcomeUnknown(
                f"{exc}; its payload {payload_id} is kept and the sweeper creates the task if it "
                "is missing: do not defer it again"
            ) from exc
        except Exception as exc:
            _forget_spill(record, exc)
            raise
    return _described(record, spec, len(reference))


def _forget_spill(record: spillover.DeferredPayload, cause: Exception) -> None:
    """Undo a spill whose task was not created; if even that fails, the sweeper enqueues it."""
    try:
        spillover.delete(record.key.id(), record.chunks)
    except api_exceptions.GoogleAPIError:
        logger.error(
            "task for spilled payload %s was not created (%s) and the payload could not be "
            "deleted; the sweeper will enqueue it",
            record.key.id(),
            cause,
        )


def _defer_transactional(data: bytes, header: dict[str, Any], spec: TaskSpec) -> DeferredTask:
    context = ndb.get_context(raise_context_error=False)
    if context is None or not context.in_transaction():
        raise DeferError("_transactional=True needs an active ndb transaction")
    spec, record, chunks = _spill(data, header, spec, transactional=True)
    if record.stored_bytes > settings().commit_bytes:
        raise DeferError(
            f"a transactional defer carries at most {settings().commit_bytes:,} bytes "
            f"(one Datastore commit); this payload is {record.stored_bytes:,}"
        )
    reference = _reference(record)
    ndb.put_multi([*chunks, record])
    context.call_on_commit(lambda: _enqueue_after_commit(record, spec, reference))
    return _described(record, spec, len(reference))


def _enqueue_after_commit(
    record: spillover.DeferredPayload, spec: TaskSpec, reference: bytes
) -> None:
    """After the commit the payload is safe; a failed enqueue is repaired by the sweeper."""
    try:
        create_task(spec, reference)
    except TaskAlreadyExistsError:
        pass
    except Exception:
        logger.exception(
            "transaction committed but the task for %s was not created; the sweeper will",
            record.key.id(),
        )


def enqueue_record(
    record: spillover.DeferredPayload, *, name: str | None = None, **overrides: Any
) -> tasks_v2.Task:
    """(Re-)create the task of a spilled record, e.g. a retrigger or a sweep.

    ``name=None`` reuses the record's task name (the sweeper: ALREADY_EXISTS means it is there);
    a retrigger passes a fresh name because Cloud Tasks refuses a name used within the hour.
    """
    spec = record_spec(record, **overrides)
    if name is not None:
        spec = dataclasses.replace(spec, name=name)
    return create_task(spec, _reference(record))


def enqueue_envelope(
    data: bytes,
    *,
    queue: str,
    function: str,
    name: str,
    headers: Mapping[str, str],
    routing: dict[str, str],
) -> tasks_v2.Task:
    """Create a task for an envelope kept inline (a failure's payload), due now."""
    spec = TaskSpec(
        queue=queue,
        url=task_url(function),
        headers={**_CONTENT_TYPE, **headers},
        eta=spillover.now(),
        name=name,
        routing=routing,
    )
    return create_task(spec, data)


def record_spec(record: spillover.DeferredPayload, **overrides: Any) -> TaskSpec:
    """The task a spilled record was created for (URL, headers, routing), due now."""
    stored = record.task or {}
    values: dict[str, Any] = {
        "queue": record.queue,
        "url": stored.get("url") or settings().task_url,
        "headers": dict(stored.get("headers") or {}),
        "eta": spillover.now(),
        "name": record.task_name,
        "routing": dict(stored.get("routing") or {}),
    }
    values.update(overrides)
    return TaskSpec(**values)
