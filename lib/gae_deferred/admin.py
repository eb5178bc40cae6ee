"""What the admin dashboard reads and does, without any web framework.

The webapp2 handlers in ``handlers/deferred_admin.py`` only parse requests and render; every
query and action lives here so it can be tested and scripted directly (inside an ndb context)::

    from gae_deferred import admin

    page = admin.list_spillover(state="pending", sort="largest")
    page.items, page.next_cursor           # records, and an opaque token for the next page
    admin.retrigger_spillover(page.items[0].id, actor="ops@example.com")
    admin.queue_overview()                 # queue.yaml merged with the Cloud Tasks API

Cost rules (DESIGN.md budgets): a list reads one page of records through a query that a
composite index in index.yaml serves, and never touches ``_DeferredPayloadChunk``. Overview
numbers use ``count()`` (keys only, capped at :data:`COUNT_CAP`) and projection queries
capped at :data:`SCAN_CAP` index entries, so their cost is bounded whatever the data size.
Errors a user can cause (bad id, bad cursor, unknown queue) raise :class:`AdminError`
subclasses that carry an HTTP status.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb, tasks_v2

from . import audit, cloud_tasks, enqueue, failures, spillover, sweeper
from ._config import settings
from ._model import MAX_INDEXED_CHARS
from ._signing import derive_key
from .errors import (
    AdminError,
    BadRequest,
    Conflict,
    Error,
    NotFound,
    QueueNotFoundError,
    Unavailable,
)
from .failures import FailureState
from .queue_config import QueueDefinition, load_queue_yaml
from .spillover import PayloadState

#: Records per list page unless the caller asks for fewer (or more, up to MAX_PAGE_SIZE).
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: count() stops here: the overview shows "10000+" rather than scanning further.
COUNT_CAP = 10_000
#: Projection queries for totals and charts read at most this many index entries.
SCAN_CAP = 5_000
#: Groups per page of the failures page, and the cap on each group's count: a count reads (on
#: the emulator) or skips (on Datastore) up to this many index entries per group shown.
GROUP_PAGE_SIZE = 20
GROUP_COUNT_CAP = 100
#: Bulk actions act on at most this many records per request.
MAX_BULK = 100
#: Tasks listed to count a queue's backlog and find its oldest task (one ListTasks page).
TASK_SCAN = 1_000

SPILL_SORTS: dict[str, Any] = {
    "oldest": spillover.DeferredPayload.created,
    "newest": -spillover.DeferredPayload.created,
    "largest": -spillover.DeferredPayload.stored_bytes,
    "smallest": spillover.DeferredPayload.stored_bytes,
}
#: "active" is every state a failure can still be retried from.
FAILURE_VIEWS = ("active", *FailureState)

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,500}$")
_QUEUE = enqueue.QUEUE_NAME
_TASK = enqueue.TASK_NAME
_VERSION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_PAGE_TOKEN = re.compile(r"^[A-Za-z0-9_=+/.-]{1,2000}$")
_HISTOGRAM_BOUNDS = (1 << 17, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
_T = TypeVar("_T")


@dataclasses.dataclass
class Page:
    """One page of a list and the token of the next page (None on the last page)."""

    items: list[Any]
    next_cursor: str | None


@dataclasses.dataclass
class BulkResult:
    """What a bulk action did: ids done, and the error message of each id that failed."""

    done: list[str]
    errors: dict[str, str]


@dataclasses.dataclass
class FailureGroup:
    """Failures sharing function and exception type, counted in one view (state)."""

    group: str
    function: str
    exception_type: str
    count: int
    last_seen: datetime.datetime
    #: True when the count hit GROUP_COUNT_CAP: the group may have more failures than ``count``.
    partial: bool


@dataclasses.dataclass
class QueueInfo:
    """A queue as queue.yaml defines it and Cloud Tasks reports it."""

    name: str
    state: str
    rate: str
    max_concurrent: int | None
    retry: dict[str, Any]
    tasks: int | None
    tasks_capped: bool
    oldest_task_age: float | None
    in_queue_yaml: bool
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- validation and cursors ---------------------------------------------------------------


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise NotFound(f"no {what} with id {value!r}")
    return value


def check_queue_name(queue: str) -> str:
    """The queue name, or NotFound when it cannot be a Cloud Tasks queue name."""
    if not isinstance(queue, str) or not _QUEUE.match(queue):
        raise NotFound(f"no queue named {queue!r}")
    return queue


def _check_version(version: str | None) -> dict[str, str]:
    if not version:
        return {}
    if not _VERSION.match(version):
        raise BadRequest(f"version {version!r} is not an App Engine version id")
    return {"version": version}


def page_size(value: int | str | None) -> int:
    """A page size from a request: default PAGE_SIZE, at most MAX_PAGE_SIZE."""
    if value in (None, ""):
        return PAGE_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"limit must be a number, not {value!r}") from exc
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    return size


def csrf_token(secret: str) -> str:
    """The CSRF token for a browser's cookie secret: HMAC with a key derived from the signing
    key, so a page of another origin can neither read nor compute it, and any instance checks it.
    """
    return hmac.new(derive_key("admin csrf"), secret.encode(), hashlib.sha256).hexdigest()


def _cursor_mac(scope: str, raw: bytes) -> str:
    message = scope.encode() + b"\0" + raw
    digest = hmac.new(derive_key("admin cursor"), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def encode_cursor(cursor: ndb.Cursor | None, scope: str) -> str | None:
    """An opaque token for a Datastore cursor, valid only for the query ``scope`` names.

    Signing the token turns a forged or mangled cursor, or one from another list or sort,
    into a clear 400 instead of whatever Datastore makes of it.
    """
    if cursor is None:
        return None
    raw = cursor.to_websafe_string()
    raw_bytes = raw if isinstance(raw, bytes) else raw.encode()
    return f"{raw_bytes.decode()}.{_cursor_mac(scope, raw_bytes)}"


def decode_cursor(token: str | None, scope: str) -> ndb.Cursor | None:
    """The Datastore cursor of a token from :func:`encode_cursor`; BadRequest if it is not one."""
    if not token:
        return None
    raw, _, mac = token.rpartition(".")
    if not raw or not hmac.compare_digest(mac.encode(), _cursor_mac(scope, raw.encode()).encode()):
        raise BadRequest("the cursor is not valid for this list (it may be from another sort)")
    try:
        return ndb.Cursor(urlsafe=raw)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise BadRequest("the cursor is malformed") from exc


def _fetch_page(query: ndb.Query, scope: str, cursor: str | None, limit: int) -> Page:
    start = decode_cursor(cursor, scope)
    try:
        items, next_cursor, more = query.fetch_page(limit, start_cursor=start)
    except api_exceptions.InvalidArgument as exc:
        raise BadRequest(f"Datastore refused the cursor: {exc.message}") from exc
    return Page(items, encode_cursor(next_cursor, scope) if more else None)


# -- spilled payloads ---------------------------------------------------------------------


def list_spillover(
    *,
    state: str = PayloadState.PENDING,
    function: str | None = None,
    queue: str | None = None,
    sort: str = "oldest",
    cursor: str | None = None,
    limit: int = PAGE_SIZE,
) -> Page:
    """One page of spilled-payload records (never their chunks).

    ``state`` is always a filter (index.yaml has a composite index for every state + optional
    function/queue filter + sort combination); ``sort`` is one of :data:`SPILL_SORTS`.
    """
    if state not in list(PayloadState):
        raise BadRequest(f"state must be one of {', '.join(PayloadState)}")
    if sort not in SPILL_SORTS:
        raise BadRequest(f"sort must be one of {', '.join(SPILL_SORTS)}")
    model = spillover.DeferredPayload
    filters = [model.state == state]
    if function:
        filters.append(model.function == function[:MAX_INDEXED_CHARS])
    if queue:
        filters.append(model.queue == check_queue_name(queue))
    query = model.query(*filters).order(SPILL_SORTS[sort])
    scope = f"spillover|{state}|{function or ''}|{queue or ''}|{sort}"
    return _fetch_page(query, scope, cursor, limit)


def get_spillover(payload_id: str) -> spillover.DeferredPayload:
    """The record (one Lookup, no chunks); NotFound when there is none."""
    record = spillover.get(_check_id(payload_id, "spilled payload"))
    if record is None:
        raise NotFound(f"no spilled payload with id {payload_id!r}")
    return record


def spillover_json(record: spillover.DeferredPayload) -> dict[str, Any]:
    """The API view of a record: DESIGN.md's fields plus eta, updated and the task route."""
    return {
        "id": record.key.id(),
        "function": record.function,
        "queue": record.queue,
        "task_name": record.task_name,
        "payload_bytes": record.payload_bytes,
        "stored_bytes": record.stored_bytes,
        "chunks": record.chunks,
        "state": record.state,
        "created": _iso(record.created),
        "updated": _iso(record.updated),
        "eta": _iso(record.eta),
        "attempts": record.attempts or 0,
    }


def _reenqueue_spilled(
    record: spillover.DeferredPayload, routing: dict[str, str], failure_id: str | None = None
) -> str:
    # A new name: Cloud Tasks refuses a name used within the last hour (9 days for queues
    # created from queue.yaml), and the old task, if still queued, must see it was superseded.
    name = cloud_tasks.new_task_name("r")
    now = _now()
    # Name and ETA follow the new task, so the sweeper sees a fresh pending record, not a
    # lost one, and recreates this task (not the old one) if the enqueue below fails.
    record.populate(state=PayloadState.PENDING, updated=now, eta=now, task_name=name)
    record.put()
    overrides: dict[str, Any] = {"eta": now}
    if routing:
        overrides["routing"] = {**((record.task or {}).get("routing") or {}), **routing}
    _cloud_tasks(
        lambda: enqueue.enqueue_record(record, name=name, failure_id=failure_id, **overrides)
    )
    return name


def retrigger_spillover(payload_id: str, actor: str, *, version: str | None = None) -> str:
    """Enqueue a new task pointing at the stored payload; returns the new task's name."""
    routing = _check_version(version)
    record = get_spillover(payload_id)
    name = _reenqueue_spilled(record, routing)
    audit.record(actor, "retrigger", f"spillover/{payload_id}", f"task {name} on {record.queue}")
    return name


def delete_spillover(payload_id: str, actor: str) -> None:
    """Delete the record, its chunks (by key, unread) and its queued task if there is one."""
    record = get_spillover(payload_id)
    spillover.delete(record.key.id(), record.chunks or 0)
    if record.task_name and record.queue:
        # Without the payload the task could only fail as "spilled payload missing".
        try:
            cloud_tasks.delete_task(record.queue, record.task_name)
        except (api_exceptions.NotFound, api_exceptions.InvalidArgument):
            pass
        except api_exceptions.GoogleAPIError:
            audit.record(actor, "delete", f"spillover/{payload_id}", "queued task not deleted")
            return
    audit.record(actor, "delete", f"spillover/{payload_id}", record.function or "")


def bulk_spillover(
    action: str, ids: Iterable[str], actor: str, *, version: str | None = None
) -> BulkResult:
    """Retrigger or delete several records; each id succeeds or fails on its own."""
    if action == "retrigger":
        routing = _check_version(version)

        def one(payload_id: str) -> None:
            retrigger_spillover(payload_id, actor, version=routing.get("version"))

    elif action == "delete":

        def one(payload_id: str) -> None:
            delete_spillover(payload_id, actor)

    else:
        raise BadRequest("action must be retrigger or delete")
    return _bulk(ids, one)


def _bulk(ids: Iterable[str], one: Callable[[str], object]) -> BulkResult:
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise BadRequest("select at least one record")
    if len(unique) > MAX_BULK:
        raise BadRequest(f"at most {MAX_BULK} records per bulk action")
    result = BulkResult([], {})
    for record_id in unique:
        try:
            one(record_id)
        except (AdminError, Error) as exc:
            result.errors[record_id] = str(exc)
        else:
            result.done.append(record_id)
    return result


# -- failures -----------------------------------------------------------------------------


def _failure_state_filter(state: str | None) -> str | None:
    if state in (None, "", "all"):
        return None
    if state not in list(FailureState):
        raise BadRequest(f"state must be all or one of {', '.join(FailureState)}")
    return state


def list_failures(
    *,
    state: str | None = None,
    group: str | None = None,
    cursor: str | None = None,
    limit: int = PAGE_SIZE,
) -> Page:
    """One page of failure records, most recently failed first, optionally of one state/group."""
    model = failures.DeferredFailure
    state = _failure_state_filter(state)
    filters = []
    if state:
        filters.append(model.state == state)
    if group:
        filters.append(model.group == group[:MAX_INDEXED_CHARS])
    query = model.query(*filters).order(-model.last_seen)
    return _fetch_page(query, f"failures|{state or ''}|{group or ''}", cursor, limit)


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


def get_failure(record_id: str) -> failures.DeferredFailure:
    """The failure record (one Lookup); NotFound when there is none."""
    record = failures.get(_check_id(record_id, "failure"))
    if record is None:
        raise NotFound(f"no failure with id {record_id!r}")
    return record


def failure_json(record: failures.DeferredFailure) -> dict[str, Any]:
    """The API view of a failure: DESIGN.md's fields plus group, payload_id, retriggered."""
    return {
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
        "payload_id": record.payload_id,
        "retriggered": record.retriggered or 0,
    }


def retrigger_failure(record_id: str, actor: str, *, version: str | None = None) -> str:
    """ "Retry now": re-enqueue the kept payload; the run updates or resolves this record."""
    routing = _check_version(version)
    record = get_failure(record_id)
    if record.state not in failures.RETRIGGERABLE:
        raise Conflict(f"failure {record_id} is {record.state}; nothing to retry")
    # The run updates this record: its id travels in the re-signed envelope.
    if record.payload_id:
        payload = spillover.get(record.payload_id)
        if payload is None:
            raise Conflict(f"the spilled payload {record.payload_id} of this failure is gone")
        name = _reenqueue_spilled(payload, routing, record_id)
    else:
        body = failures.get_payload(record_id)
        if body is None:
            raise Conflict(f"failure {record_id} kept no payload to retry")
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
    record.state = FailureState.RETRYING
    record.retriggered = (record.retriggered or 0) + 1
    record.put()
    audit.record(actor, "retrigger", f"failure/{record_id}", f"task {name} on {record.queue}")
    return name


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


def bulk_failures(action: str, ids: Iterable[str], actor: str) -> BulkResult:
    """Retrigger, dismiss or delete several failures by id."""
    actions: dict[str, Callable[[str, str], object]] = {
        "retrigger": retrigger_failure,
        "dismiss": dismiss_failure,
        "delete": delete_failure,
    }
    if action not in actions:
        raise BadRequest("action must be retrigger, dismiss or delete")
    chosen = actions[action]
    return _bulk(ids, lambda record_id: chosen(record_id, actor))


def retry_group(group: str, actor: str) -> BulkResult:
    """Retry up to MAX_BULK retriggerable failures of a group (newest first)."""
    if not group:
        raise BadRequest("no group given")
    model = failures.DeferredFailure
    futures = [
        model.query(model.group == group[:MAX_INDEXED_CHARS], model.state == state)
        .order(-model.last_seen)
        .fetch_async(MAX_BULK, keys_only=True)
        for state in failures.RETRIGGERABLE
    ]
    ids = [key.id() for future in futures for key in future.result()][:MAX_BULK]
    if not ids:
        raise NotFound(f"group {group!r} has no failure to retry")
    return _bulk(ids, lambda record_id: retrigger_failure(record_id, actor))


# -- overview -----------------------------------------------------------------------------


@dataclasses.dataclass
class Overview:
    """Numbers for the overview page; ``*_capped`` means "at least this many"."""

    spill_counts: dict[str, int]
    spill_counts_capped: dict[str, bool]
    stored_bytes: int
    stored_scanned: int
    stored_capped: bool
    size_histogram: list[tuple[str, int]]
    failures_hour: int
    failures_day: int
    failures_capped: bool
    failures_by_hour: list[tuple[datetime.datetime, int]]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["failures_by_hour"] = [[_iso(hour), count] for hour, count in self.failures_by_hour]
        return data


def _histogram_label(index: int) -> str:
    bounds = _HISTOGRAM_BOUNDS
    if index == 0:
        return f"< {format_bytes(bounds[0])}"
    if index == len(bounds):
        return f">= {format_bytes(bounds[-1])}"
    return f"{format_bytes(bounds[index - 1])}-{format_bytes(bounds[index])}"


def format_bytes(size: int | None) -> str:
    """``"1.5 MiB"``, ``"128 KiB"``, ``"12 B"``; ``"-"`` for None."""
    if size is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} B"


def overview() -> Overview:
    """Counts and chart data, with bounded cost (see the module docstring).

    Spillover counts: ``count(limit=COUNT_CAP)`` per state (built-in index on ``state``).
    Stored bytes and size histogram: a projection on ``stored_bytes`` of at most SCAN_CAP
    records. Failures in the last hour/day: ``count(limit=COUNT_CAP)`` on ``last_seen``; the
    24 h chart: a projection on ``last_seen`` of at most SCAN_CAP records.
    """
    payload, failure = spillover.DeferredPayload, failures.DeferredFailure
    now = _now()
    day_ago = now - datetime.timedelta(days=1)
    counts = {
        state: payload.query(payload.state == state).count_async(limit=COUNT_CAP)
        for state in PayloadState
    }
    sizes = payload.query(projection=[payload.stored_bytes]).fetch_async(SCAN_CAP)
    hour = failure.query(failure.last_seen >= now - datetime.timedelta(hours=1)).count_async(
        limit=COUNT_CAP
    )
    day = failure.query(failure.last_seen >= day_ago).count_async(limit=COUNT_CAP)
    seen = failure.query(failure.last_seen >= day_ago, projection=[failure.last_seen]).fetch_async(
        SCAN_CAP
    )
    spill_counts = {state: future.result() for state, future in counts.items()}
    size_rows = sizes.result()
    histogram = [0] * (len(_HISTOGRAM_BOUNDS) + 1)
    for row in size_rows:
        histogram[sum(1 for bound in _HISTOGRAM_BOUNDS if row.stored_bytes >= bound)] += 1
    start = now.replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=23)
    by_hour = [0] * 24
    for row in seen.result():
        slot = int((row.last_seen - start).total_seconds() // 3600)
        if 0 <= slot < 24:
            by_hour[slot] += 1
    failures_day = day.result()
    return Overview(
        spill_counts=spill_counts,
        spill_counts_capped={state: count >= COUNT_CAP for state, count in spill_counts.items()},
        stored_bytes=sum(row.stored_bytes for row in size_rows),
        stored_scanned=len(size_rows),
        stored_capped=len(size_rows) >= SCAN_CAP,
        size_histogram=[(_histogram_label(i), n) for i, n in enumerate(histogram)],
        failures_hour=hour.result(),
        failures_day=failures_day,
        failures_capped=failures_day >= COUNT_CAP,
        failures_by_hour=[(start + datetime.timedelta(hours=i), n) for i, n in enumerate(by_hour)],
    )


# -- queues and tasks (Cloud Tasks API) ---------------------------------------------------


def _cloud_tasks(call: Callable[[], _T]) -> _T:
    """Run a Cloud Tasks call, turning its errors into AdminErrors with a status."""
    try:
        return call()
    except (api_exceptions.NotFound, QueueNotFoundError) as exc:
        raise NotFound(str(getattr(exc, "message", exc))) from exc
    except api_exceptions.InvalidArgument as exc:
        raise BadRequest(exc.message) from exc
    except api_exceptions.FailedPrecondition as exc:
        raise Conflict(exc.message) from exc
    except (api_exceptions.GoogleAPIError, Error) as exc:
        raise Unavailable(f"Cloud Tasks: {exc}") from exc


def _queue_definitions() -> dict[str, QueueDefinition]:
    path = settings().queue_yaml
    if not path or not os.path.exists(path):
        return {}
    return load_queue_yaml(path)


def _retry_json(definition: QueueDefinition | None, queue: tasks_v2.Queue | None) -> dict:
    """The retry policy in Cloud Tasks' terms (queue.yaml's when Cloud Tasks has no queue)."""
    if queue is not None and "retry_config" in queue:
        config = queue.retry_config
        return {
            "max_attempts": config.max_attempts,
            "max_retry_duration": _seconds(config.max_retry_duration),
            "min_backoff": _seconds(config.min_backoff),
            "max_backoff": _seconds(config.max_backoff),
            "max_doublings": config.max_doublings,
        }
    if definition is not None:
        retry = definition.retry
        return {
            "max_attempts": (
                retry.task_retry_limit + 1 if retry.task_retry_limit is not None else -1
            ),
            "max_retry_duration": retry.task_age_limit or 0.0,
            "min_backoff": retry.min_backoff_seconds,
            "max_backoff": retry.max_backoff_seconds,
            "max_doublings": retry.max_doublings,
        }
    return {}


def _seconds(value: Any) -> float | None:
    return value.total_seconds() if isinstance(value, datetime.timedelta) else None


def _backlog(queue: str) -> tuple[int, bool, float | None]:
    tasks, next_token = cloud_tasks.list_tasks_page(queue, page_size=TASK_SCAN)
    now = _now()
    created = [task.create_time for task in tasks if task.create_time]
    oldest = (now - min(created)).total_seconds() if created else None
    return len(tasks), next_token is not None, oldest


def queue_overview() -> list[QueueInfo]:
    """Every queue in queue.yaml or Cloud Tasks, with its state and backlog.

    The backlog is the first ListTasks page (BASIC view, TASK_SCAN tasks): "1000+" beyond.
    A queue Cloud Tasks cannot describe is listed with the error instead of failing the page.
    """
    definitions = _queue_definitions()
    live: dict[str, tasks_v2.Queue] = {}
    error = None
    try:
        for queue in cloud_tasks.list_queues():
            live[cloud_tasks.short_name(queue.name)] = queue
    except api_exceptions.GoogleAPIError as exc:
        error = f"Cloud Tasks: {exc}"
    infos = []
    for name in sorted(set(definitions) | set(live)):
        definition, queue = definitions.get(name), live.get(name)
        info = QueueInfo(
            name=name,
            state=queue.state.name if queue is not None else ("UNKNOWN" if error else "MISSING"),
            rate=(
                definition.rate_text
                if definition is not None
                else f"{queue.rate_limits.max_dispatches_per_second:g}/s"
            ),
            max_concurrent=(
                queue.rate_limits.max_concurrent_dispatches
                if queue is not None
                else definition.max_concurrent_requests
            ),
            retry=_retry_json(definition, queue),
            tasks=None,
            tasks_capped=False,
            oldest_task_age=None,
            in_queue_yaml=definition is not None,
            error=error if queue is None else None,
        )
        if queue is not None:
            try:
                info.tasks, info.tasks_capped, info.oldest_task_age = _backlog(name)
            except api_exceptions.GoogleAPIError as exc:
                info.error = f"Cloud Tasks: {exc}"
        elif error is None:
            info.error = "not in Cloud Tasks: run `python -m gae_deferred.queues sync`"
        infos.append(info)
    return infos


def get_queue(queue: str) -> tasks_v2.Queue:
    """The Cloud Tasks queue; NotFound for a name that is not a queue."""
    check_queue_name(queue)
    return _cloud_tasks(lambda: cloud_tasks.get_queue(queue))


def list_tasks(queue: str, *, page_token: str | None = None, limit: int = PAGE_SIZE) -> Page:
    """One ListTasks page (BASIC view: no bodies) and the page token of the next."""
    get_queue(queue)
    if page_token and not _PAGE_TOKEN.match(page_token):
        raise BadRequest("the cursor is malformed")
    tasks, next_token = _cloud_tasks(
        lambda: cloud_tasks.list_tasks_page(queue, page_size=limit, page_token=page_token or "")
    )
    return Page(tasks, next_token)


def task_json(task: tasks_v2.Task) -> dict[str, Any]:
    """The API view of a Cloud Tasks task."""
    last = task.last_attempt if "last_attempt" in task else None
    response = None
    if last is not None and "response_status" in last:
        response = {"code": last.response_status.code, "message": last.response_status.message}
    request = task.app_engine_http_request
    return {
        "name": task.name.rsplit("/", 1)[-1],
        "path": task.name,
        "schedule_time": _iso(task.schedule_time) if "schedule_time" in task else None,
        "create_time": _iso(task.create_time) if "create_time" in task else None,
        "dispatch_count": task.dispatch_count,
        "response_count": task.response_count,
        "last_response": response,
        "last_attempt_time": (
            _iso(last.dispatch_time) if last is not None and "dispatch_time" in last else None
        ),
        "url": request.relative_uri if "app_engine_http_request" in task else None,
    }


def _check_task(queue: str, task: str) -> None:
    check_queue_name(queue)
    if not isinstance(task, str) or not _TASK.match(task):
        raise NotFound(f"no task named {task!r}")


def run_task(queue: str, task: str, actor: str) -> None:
    """Dispatch a queued task now (RunTask)."""
    _check_task(queue, task)
    _cloud_tasks(lambda: cloud_tasks.run_task(queue, task))
    audit.record(actor, "run", f"task/{queue}/{task}")


def delete_task(queue: str, task: str, actor: str) -> None:
    """Delete a queued task."""
    _check_task(queue, task)
    _cloud_tasks(lambda: cloud_tasks.delete_task(queue, task))
    audit.record(actor, "delete", f"task/{queue}/{task}")


def pause_queue(queue: str, actor: str) -> None:
    """Stop dispatching (PauseQueue); tasks stay queued and can still be added."""
    check_queue_name(queue)
    _cloud_tasks(lambda: cloud_tasks.pause_queue(queue))
    audit.record(actor, "pause", f"queue/{queue}")


def resume_queue(queue: str, actor: str) -> None:
    """Dispatch again (ResumeQueue)."""
    check_queue_name(queue)
    _cloud_tasks(lambda: cloud_tasks.resume_queue(queue))
    audit.record(actor, "resume", f"queue/{queue}")


def purge_queue(queue: str, actor: str) -> None:
    """Delete every task of the queue (spilled records stay: the sweeper re-enqueues them)."""
    check_queue_name(queue)
    _cloud_tasks(lambda: cloud_tasks.purge_queue(queue))
    audit.record(actor, "purge", f"queue/{queue}")


# -- audit and sweeper --------------------------------------------------------------------


def list_audit(*, cursor: str | None = None, limit: int = PAGE_SIZE) -> Page:
    """One page of audit entries, newest first."""
    entries, next_cursor = audit.recent(limit, decode_cursor(cursor, "audit"))
    return Page(entries, encode_cursor(next_cursor, "audit"))


def audit_json(entry: audit.DeferredAudit) -> dict[str, Any]:
    """The API view of an audit entry."""
    return {
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "when": _iso(entry.when),
        "detail": entry.detail,
    }


def run_sweeper(actor: str, *, audit_idle: bool = True) -> dict[str, Any]:
    """Run the sweeper once and audit it; a scheduled run that did nothing is not audited."""
    data = dataclasses.asdict(sweeper.sweep())
    summary = ", ".join(f"{key} {value}" for key, value in data.items() if value)
    if summary or audit_idle:
        audit.record(actor, "sweep", "sweeper", summary or "nothing to do")
    return data


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
