"""Failures on the dashboard: groups, lists, detail, retry, dismiss, delete, in bulk."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Iterable
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb

from .. import audit, cloud_tasks, enqueue, envelope, failures, spillover
from .._config import settings
from .._model import MAX_INDEXED_CHARS
from ..errors import (
    BadRequest,
    Conflict,
    Error,
    NotFound,
)
from ..failures import FailureState
from ..queue_config import RetryParameters
from ._common import (
    _VERSION,
    FAILURE_VIEWS,
    GROUP_COUNT_CAP,
    GROUP_PAGE_SIZE,
    MAX_BULK,
    PAGE_SIZE,
    BulkResult,
    FailureGroup,
    Page,
    _bulk,
    _check_version,
    _cloud_tasks,
    _fetch_page,
    _iso,
    _key_name,
    choose_action,
    deferred_by,
)
from .filters import (
    FailureFilter,
    _bulk_matching,
)
from .header import header_rows
from .queued import _queue_definitions
from .spilled import (
    _reenqueue_spilled,
)


def list_failures(
    wanted: FailureFilter | None = None, *, cursor: str | None = None, limit: int = PAGE_SIZE
) -> Page:
    """One page of failure records that ``wanted`` matches (default: all, newest first)."""
    wanted = wanted or FailureFilter()
    return _fetch_page(wanted.query(), wanted.scope(), cursor, limit)


def failure_groups(
    view: str = "active", cursor: str | None = None, limit: int = GROUP_PAGE_SIZE
) -> Page:
    """One page of failure groups (function + exception type), most recently failing first.

    Reads one page of ``_DeferredFailureGroup`` markers and, per group, one count of its
    failures in ``view`` bounded by GROUP_COUNT_CAP (index (group, active) or (group, state)): the
    cost does not grow with the number of failures. Groups with none in ``view`` are left out.
    """
    if view not in FAILURE_VIEWS:
        raise BadRequest(f"view must be one of {', '.join(FAILURE_VIEWS)}")
    marker = failures.DeferredFailureGroup
    page = _fetch_page(marker.query().order(-marker.last_seen), f"groups|{view}", cursor, limit)
    model = failures.DeferredFailure
    in_view = model.active == True if view == "active" else model.state == view  # noqa: E712
    counts = [
        model.query(model.group == group.group, in_view).count_async(limit=GROUP_COUNT_CAP)
        for group in page.items
    ]
    groups = [
        FailureGroup(
            group.group,
            group.function,
            group.exception_type,
            count.result(),
            group.last_seen,
            count.result() >= GROUP_COUNT_CAP,
        )
        for group, count in zip(page.items, counts, strict=True)
    ]
    return Page([group for group in groups if group.count], page.next_cursor)


def group_json(group: FailureGroup) -> dict[str, Any]:
    """The API view of a failure group."""
    return {**dataclasses.asdict(group), "last_seen": _iso(group.last_seen)}


def get_failure(record_id: str) -> failures.DeferredFailure:
    """The failure record (one Lookup); NotFound when there is none."""
    record = failures.get(_key_name(record_id, "failure"))
    if record is None:
        raise NotFound(f"no failure with id {record_id!r}")
    return record


def failure_json(record: failures.DeferredFailure, *, detail: bool = False) -> dict[str, Any]:
    """The API view of a failure: docs/design.md's fields plus group, payload_id, retriggered
    (and ``meta`` — the envelope header — and ``deferred_by`` in detail)."""
    data = {
        "id": record.key.id(),
        "function": record.function,
        "exception_type": record.exception_type,
        "group": record.group,
        "message": record.message,
        "traceback": record.traceback,
        "attempts": record.attempts or 0,
        "state": record.state,
        "first_seen": _iso(record.first_seen),
        "last_seen": _iso(record.last_seen),
        "task_name": record.task_name,
        "queue": record.queue,
        "namespace": record.namespace,
        "payload_id": record.payload_id,
        "retriggered": record.retriggered or 0,
        "retriggerable": record.state in failures.RETRIGGERABLE,
    }
    if detail:
        data["meta"] = record.meta or {}
        data["header"] = header_rows(record.meta)
        data["deferred_by"] = deferred_by(record.meta)
        data["made_by_version"] = made_by_version(record.meta)
    return data


def next_attempt(record: failures.DeferredFailure) -> str | None:
    """When Cloud Tasks next runs a retrying failure's task (one GetTask, BASIC view), ISO; None
    for other states, or when the task is gone or Cloud Tasks cannot say. The detail page asks;
    lists do not (a GetTask per row)."""
    if record.state != FailureState.RETRYING or not (record.queue and record.task_name):
        return None
    try:
        task = cloud_tasks.get_task(record.queue, record.task_name)
    except (api_exceptions.GoogleAPIError, Error):
        return None
    return _iso(task.schedule_time) if "schedule_time" in task else None


def retry_delay(retry: RetryParameters, attempts: int) -> float:
    """Seconds Cloud Tasks waits after the ``attempts``-th failed attempt: ``min_backoff``
    doubled ``max_doublings`` times, then growing by that last step, capped at ``max_backoff``
    (10s, 300s, 3 doublings: 10, 20, 40, 80, 160, 240, 300, 300 ...)."""
    step = max(1, attempts)
    doublings = retry.max_doublings
    if step <= doublings + 1:
        delay = retry.min_backoff_seconds * 2 ** (step - 1)
    else:
        delay = retry.min_backoff_seconds * 2**doublings * (step - doublings)
    return min(delay, retry.max_backoff_seconds)


def estimated_next_attempts(records: list[failures.DeferredFailure]) -> dict[str, str]:
    """Failure id -> ISO estimate of the next attempt of each retrying failure on a list page:
    its last failure plus its queue's backoff (queue.yaml) for that many attempts. No RPC (a
    GetTask per row would be the cost); the failure's own page asks Cloud Tasks."""
    definitions = _queue_definitions()
    estimates = {}
    for record in records:
        definition = definitions.get(record.queue or "")
        if record.state != FailureState.RETRYING or definition is None or not record.last_seen:
            continue
        delay = retry_delay(definition.retry, record.attempts or 1)
        estimates[record.key.id()] = _iso(record.last_seen + datetime.timedelta(seconds=delay))
    return estimates


def made_by_version(meta: dict[str, Any] | None) -> str | None:
    """The App Engine version whose code made the payload (its envelope's ``app_version``), when
    it is one a retrigger can route to: a version-skew failure is retried there."""
    version = (meta or {}).get("app_version")
    if not isinstance(version, str) or version == "unknown" or not _VERSION.match(version):
        return None
    return version


def _check_retriable_id(record_id: str) -> None:
    """Only ids gae_deferred made are handed to a retried task: its run writes under this id."""
    if not failures.is_generated_id(record_id):
        raise Conflict(
            f"failure {record_id!r} has an id gae_deferred does not make (an older version "
            "took it from a request header): it can be dismissed or deleted, not retried"
        )


def retrigger_failure(record_id: str, actor: str, *, version: str | None = None) -> str:
    """ "Retry now": re-enqueue the kept payload; the run updates or resolves this record."""
    routing = _check_version(version)
    record = get_failure(record_id)
    if record.state not in failures.RETRIGGERABLE:
        raise Conflict(f"failure {record_id} is {record.state}; nothing to retry")
    _check_retriable_id(record_id)
    send = _retrigger_send(record, record_id, routing)
    previous = record.state
    # Written before the task exists: its run updates or resolves this record, and a write
    # made after the enqueue could land after that run and undo it (a dashboard retry showed
    # "retrying" for a task that had already succeeded).
    record.state = FailureState.RETRYING
    record.retriggered = (record.retriggered or 0) + 1
    record.put()
    try:
        name = send()
    except Exception:
        _undo_retrying(record_id, previous)
        raise
    audit.record(actor, "retrigger", f"failure/{record_id}", f"task {name} on {record.queue}")
    return name


def _retrigger_send(
    record: failures.DeferredFailure, record_id: str, routing: dict[str, str]
) -> Callable[[], str]:
    """What creates the retry's task (its name returned), once the kept payload is checked;
    the run updates this record: its id travels in the re-signed envelope."""
    if record.payload_id:
        payload = spillover.get(record.payload_id)
        if payload is None:
            raise Conflict(f"the spilled payload {record.payload_id} of this failure is gone")
        return lambda: _reenqueue_spilled(payload, routing, record_id)
    body = failures.get_payload(record_id)
    if body is None:
        raise Conflict(f"failure {record_id} kept no payload to retry")
    if not body.startswith(envelope.MAGIC):
        raise Conflict(
            f"failure {record_id} kept a python27 pickle that does not load here, not an "
            "envelope: it cannot be retried (dismiss or delete it)"
        )

    def send() -> str:
        name = cloud_tasks.new_task_name("r")
        _cloud_tasks(
            lambda: enqueue.enqueue_envelope(
                body,
                queue=record.queue or settings().default_queue,
                name=name,
                routing=routing,
                failure_id=record_id,
            )
        )
        return name

    return send


def _undo_retrying(record_id: str, previous: str) -> None:
    """A retry whose task could not be created: the record goes back to ``previous``, unless
    a run (of a task that was created after all) has changed it meanwhile."""

    def undo() -> None:
        current = failures.get(record_id)
        if current is not None and current.state == FailureState.RETRYING:
            current.state = previous
            current.retriggered = max(0, (current.retriggered or 0) - 1)
            current.put()

    ndb.transaction(undo)


def dismiss_failure(record_id: str, actor: str) -> None:
    """Mark a failure dismissed: it leaves the active view; its payload is kept until swept."""
    record = get_failure(record_id)
    record.state = FailureState.DISMISSED
    record.put()
    audit.record(actor, "dismiss", f"failure/{record_id}", record.group or "")


def delete_failure(record_id: str, actor: str) -> None:
    """Delete a failure record and its kept inline payload (a spilled payload stays listed)."""
    record = get_failure(record_id)
    ndb.delete_multi([record.key, failures.payload_key(record_id)])
    audit.record(actor, "delete", f"failure/{record_id}", record.group or "")


def _failure_action(action: str, actor: str, version: str | None) -> Callable[[str], object]:
    actions = {"retrigger": retrigger_failure, "dismiss": dismiss_failure, "delete": delete_failure}
    return choose_action(action, actions, actor, version)


def bulk_failures(
    action: str, ids: Iterable[str], actor: str, *, version: str | None = None
) -> BulkResult:
    """Retrigger, dismiss or delete several failures by id."""
    return _bulk(ids, _failure_action(action, actor, version))


def bulk_failures_matching(
    action: str,
    wanted: FailureFilter,
    actor: str,
    *,
    version: str | None = None,
    expected: int | None = None,
) -> BulkResult:
    """Retrigger, dismiss or delete every failure ``wanted`` matches, up to MAX_MATCHING; with
    ``expected``, only if exactly that many match."""
    one = _failure_action(action, actor, version)
    return _bulk_matching(action, wanted, actor, "failures", one, expected)


def retriable_states(view: str) -> tuple[str, ...]:
    """The states a group retry from ``view`` touches: all retriable ones for "active", else
    that one state (BadRequest for a view nothing can be retried from)."""
    if view == "active":
        return tuple(failures.RETRIGGERABLE)
    if view not in failures.RETRIGGERABLE:
        raise BadRequest(f"view must be active or one of {', '.join(failures.RETRIGGERABLE)}")
    return (view,)


def _group_queries(group: str, states: tuple[str, ...]) -> list[ndb.Query]:
    if not group:
        raise BadRequest("no group given")
    model = failures.DeferredFailure
    return [
        model.query(model.group == group[:MAX_INDEXED_CHARS], model.state == state)
        for state in states
    ]


def count_group(group: str, states: tuple[str, ...]) -> int:
    """How many failures of the group are in ``states``, counting at most MAX_BULK of each."""
    futures = [query.count_async(limit=MAX_BULK) for query in _group_queries(group, states)]
    return min(sum(future.result() for future in futures), MAX_BULK)


def retry_group(
    group: str, actor: str, *, states: tuple[str, ...] = tuple(failures.RETRIGGERABLE)
) -> BulkResult:
    """Retry up to MAX_BULK failures of a group in ``states`` (default: every retriable one),
    newest first."""
    model = failures.DeferredFailure
    futures = [
        query.order(-model.last_seen).fetch_async(MAX_BULK, keys_only=True)
        for query in _group_queries(group, states)
    ]
    ids = [key.id() for future in futures for key in future.result()][:MAX_BULK]
    if not ids:
        raise NotFound(f"group {group!r} has no failure to retry")
    return _bulk(ids, lambda record_id: retrigger_failure(record_id, actor))
