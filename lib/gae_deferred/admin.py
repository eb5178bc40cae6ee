"""What the admin dashboard reads and does, without any web framework.

The webapp2 handlers in ``handlers/deferred_admin.py`` only parse requests and render; every
query, action and JSON shape lives here so it can be tested and scripted directly (inside an
ndb context)::

    from gae_deferred import admin

    wanted = admin.SpillFilter.parse({"state": "dead", "function": "reports", "sort": "largest"})
    page = admin.list_spillover(wanted)
    page.items, page.next_cursor           # records, and an opaque token for the next page
    admin.retrigger_spillover(page.items[0].id, actor="ops@example.com")
    admin.count_matching(wanted)           # what "retrigger everything this filter matches" hits
    admin.queue_overview()                 # queue.yaml merged with the Cloud Tasks API

Cost rules (DESIGN.md budgets): a list reads one page of records through a query that a
composite index in index.yaml serves (filters are equality filters on the records' ``facets``
list, see :mod:`gae_deferred._facets`), and never touches ``_DeferredPayloadChunk``. Overview
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
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb, tasks_v2

from . import _facets, audit, cloud_tasks, enqueue, envelope, failures, metrics, spillover, sweeper
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
#: Bulk actions on chosen ids act on at most this many records per request.
MAX_BULK = 100
#: "Everything this filter matches" acts on at most this many records, MAX_BULK at a time.
MAX_MATCHING = 1_000
#: Tasks listed to count a queue's backlog and find its oldest task (one ListTasks page).
TASK_SCAN = 1_000

SPILL_SORTS: dict[str, Any] = {
    "oldest": spillover.DeferredPayload.created,
    "newest": -spillover.DeferredPayload.created,
    "largest": -spillover.DeferredPayload.stored_bytes,
    "smallest": spillover.DeferredPayload.stored_bytes,
}
FAILURE_SORTS: dict[str, Any] = {
    "newest": -failures.DeferredFailure.last_seen,
    "oldest": failures.DeferredFailure.last_seen,
    "attempts": -failures.DeferredFailure.attempts,
}
#: "active" is every state a failure can still be retried from.
FAILURE_VIEWS = ("active", *FailureState)

_QUEUE = enqueue.QUEUE_NAME
_TASK = enqueue.TASK_NAME
_VERSION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_PAGE_TOKEN = re.compile(r"^[A-Za-z0-9_=+/.-]{1,2000}$")
#: Ids that travel in a URL path segment as they are: no leading dot, so never "." or "..".
_URL_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,499}$")
#: Longer ids are refused unread: Datastore caps key names at 1,500 bytes, though an emulator
#: (or an older version's records) may hold longer ones, which must stay viewable.
_MAX_ID_CHARS = 4000
_RELATIVE_TIME = re.compile(r"^(\d{1,4})([mhd])$")
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

    @property
    def summary(self) -> str:
        return f"{len(self.done)} done, {len(self.errors)} failed"


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


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# -- ids in URLs, validation and cursors --------------------------------------------------


def url_id(value: str) -> str:
    """A record id, queue or task name as one URL path segment that decodes back to it.

    Ids of our own format pass as they are; anything else (an old record whose id came from a
    request header: ``../queues/x/pause?y=``, ``a/b``, 2,000 characters) becomes ``~`` and its
    UTF-8 in unpadded base64url, so it can neither leave its segment nor be normalised away::

        url_id("f-0123")      # 'f-0123'
        url_id("a/b")         # '~YS9i'
        id_from_url("~YS9i")  # 'a/b'
    """
    if _URL_SAFE_ID.match(value):
        return value
    return "~" + base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def id_from_url(segment: str) -> str:
    """The id :func:`url_id` encoded; NotFound when ``~...`` is not valid base64url UTF-8."""
    if not segment.startswith("~"):
        return segment
    encoded = segment[1:]
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise NotFound(f"no record with id {segment!r}") from exc


def _key_name(value: str, what: str) -> str:
    """Any id Datastore can hold, odd ones included: they are looked up, never trusted."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > _MAX_ID_CHARS
        or (value.startswith("__") and value.endswith("__"))
    ):
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


def _mac(purpose: str, message: bytes) -> bytes:
    return hmac.new(derive_key(purpose), message, hashlib.sha256).digest()


def csrf_token(secret: str) -> str:
    """The CSRF token for a browser's cookie secret: HMAC with a key derived from the signing
    key, so a page of another origin can neither read nor compute it, and any instance checks it.
    """
    return hmac.new(derive_key("admin csrf"), secret.encode(), hashlib.sha256).hexdigest()


def seal_message(message: str) -> str:
    """A tamper-proof cookie value for a one-time flash message (see :func:`open_message`)."""
    raw = base64.urlsafe_b64encode(message.encode()).decode().rstrip("=")
    mac = base64.urlsafe_b64encode(_mac("admin flash", raw.encode())[:16]).decode().rstrip("=")
    return f"{raw}.{mac}"


def open_message(sealed: str) -> str | None:
    """The message :func:`seal_message` sealed, or None for anything forged or mangled."""
    raw, _, mac = sealed.rpartition(".")
    expected = base64.urlsafe_b64encode(_mac("admin flash", raw.encode())[:16]).decode()
    if not raw or not hmac.compare_digest(mac.encode(), expected.rstrip("=").encode()):
        return None
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _cursor_mac(scope: str, raw: bytes) -> str:
    digest = _mac("admin cursor", scope.encode() + b"\0" + raw)
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


# -- filters --------------------------------------------------------------------------------


def parse_time(value: str | None, name: str) -> datetime.datetime | None:
    """``15m``, ``2h``, ``7d`` (that long ago) or an ISO date/time (UTC unless it says)."""
    if not value:
        return None
    relative = _RELATIVE_TIME.match(value)
    if relative:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[relative.group(2)]
        return _now() - datetime.timedelta(**{unit: int(relative.group(1))})
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadRequest(f"{name} must be like 2h, 7d or 2026-01-31T12:00, not {value!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


@dataclasses.dataclass(frozen=True)
class _Filter:
    """What a list shows: parsed once from request parameters, turned back into URL params."""

    #: Request parameter names, in the order URLs list them.
    FIELDS: ClassVar[tuple[str, ...]] = ()
    since: str = ""
    until: str = ""

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Any:
        """A filter from request parameters (unknown ones ignored); BadRequest if invalid."""
        values = {
            name: str(params.get(name) or "").strip()
            for name in cls.FIELDS
            if params.get(name) not in (None, "")
        }
        wanted = cls(**values)
        wanted.validate()
        return wanted

    def params(self) -> dict[str, str]:
        """The non-default parameters, for shareable links and the JSON API."""
        default = type(self)()
        return {
            name: getattr(self, name)
            for name in self.FIELDS
            if getattr(self, name) != getattr(default, name)
        }

    def window(self) -> tuple[datetime.datetime | None, datetime.datetime | None]:
        return parse_time(self.since, "since"), parse_time(self.until, "until")

    def tokens(self) -> list[str]:
        raise NotImplementedError

    def validate(self) -> None:
        self.window()
        self.tokens()

    def scope(self) -> str:
        """What a cursor is valid for: these exact filters."""
        return json.dumps([type(self).__name__, self.params()], sort_keys=True)


def _function_token(function: str) -> str:
    return f"fn:{function}"[:MAX_INDEXED_CHARS]


@dataclasses.dataclass(frozen=True)
class FailureFilter(_Filter):
    """Failure list filters: every one optional, all combined (AND).

    ``function`` a dotted prefix of the function name, ``exception`` a qualified or bare class
    name, ``q`` words that must all appear in the message, ``since``/``until`` bound
    ``last_seen``, ``group`` one failures-page group (``function|exception_type``).
    """

    FIELDS: ClassVar[tuple[str, ...]] = (
        "state",
        "function",
        "exception",
        "queue",
        "q",
        "group",
        "since",
        "until",
        "sort",
    )
    state: str = "all"
    function: str = ""
    exception: str = ""
    queue: str = ""
    q: str = ""
    group: str = ""
    sort: str = "newest"

    def tokens(self) -> list[str]:
        if self.state != "all" and self.state not in FAILURE_VIEWS:
            raise BadRequest(f"state must be all or one of {', '.join(FAILURE_VIEWS)}")
        if self.sort not in FAILURE_SORTS:
            raise BadRequest(f"sort must be one of {', '.join(FAILURE_SORTS)}")
        tokens = [] if self.state == "all" else [f"state:{self.state}"]
        if self.function:
            tokens.append(_function_token(self.function))
        if self.exception:
            tokens.append(f"exc:{self.exception}"[:MAX_INDEXED_CHARS])
        if self.queue:
            tokens.append(f"queue:{self.queue}"[:MAX_INDEXED_CHARS])
        if self.group:
            function, _, exception_type = self.group.rpartition("|")
            tokens += [f"fx:{function}"[:MAX_INDEXED_CHARS], f"exc:{exception_type}"]
        words = _facets.words(self.q)
        if self.q and not words:
            raise BadRequest("search words need at least 2 letters or digits")
        return list(dict.fromkeys([*tokens, *(f"w:{word}" for word in words)]))

    def query(self) -> ndb.Query:
        model = failures.DeferredFailure
        conditions = [model.facets == token for token in self.tokens()]
        since, until = self.window()
        if not (since or until):
            return model.query(*conditions).order(FAILURE_SORTS[self.sort])
        if self.sort == "attempts":
            raise BadRequest("a time range lists by time: sort newest or oldest")
        return _time_range(
            model.query(*conditions), model.last_seen, model.seen_desc, since, until, self.sort
        )

    def describe(self) -> str:
        labels = {"q": "message words", "since": "seen since", "until": "seen before"}
        parts = [
            f"{labels.get(name, name)} {value}"
            for name, value in self.params().items()
            if name != "sort"
        ]
        return "every failure" if not parts else "failures with " + ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class SpillFilter(_Filter):
    """Spilled-payload filters: ``state`` (always), dotted ``function`` prefix, ``queue``,
    ``since``/``until`` on ``created`` (with the oldest/newest sorts)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("state", "function", "queue", "since", "until", "sort")
    state: str = PayloadState.PENDING.value
    function: str = ""
    queue: str = ""
    sort: str = "oldest"

    def tokens(self) -> list[str]:
        if self.state not in list(PayloadState):
            raise BadRequest(f"state must be one of {', '.join(PayloadState)}")
        if self.sort not in SPILL_SORTS:
            raise BadRequest(f"sort must be one of {', '.join(SPILL_SORTS)}")
        tokens = [f"state:{self.state}"]
        if self.function:
            tokens.append(_function_token(self.function))
        if self.queue:
            tokens.append(f"queue:{self.queue}"[:MAX_INDEXED_CHARS])
        return tokens

    def query(self) -> ndb.Query:
        model = spillover.DeferredPayload
        conditions = [model.facets == token for token in self.tokens()]
        since, until = self.window()
        if not (since or until):
            return model.query(*conditions).order(SPILL_SORTS[self.sort])
        if self.sort not in ("oldest", "newest"):
            raise BadRequest("a time range lists by time: sort oldest or newest")
        return _time_range(
            model.query(*conditions), model.created, model.created_desc, since, until, self.sort
        )

    def describe(self) -> str:
        parts = [f"{name} {value}" for name, value in self.params().items() if name != "sort"]
        return f"{self.state} spilled payloads" + (" with " + ", ".join(parts) if parts else "")


def _time_range(
    query: ndb.Query,
    ascending: Any,
    descending_ms: Any,
    since: datetime.datetime | None,
    until: datetime.datetime | None,
    sort: str,
) -> ndb.Query:
    """``query`` limited to [since, until), oldest or newest first.

    The range is the only inequality and the query has no sort order: its results come in the
    order of the range's property, which Datastore, the emulator and the test stub all serve
    from one (facets, property) index. "newest" ranges over the negated copy of the time.
    """
    if sort == "newest":
        if since:
            query = query.filter(descending_ms <= _facets.descending_ms(since))
        if until:
            query = query.filter(descending_ms > _facets.descending_ms(until))
        return query
    if since:
        query = query.filter(ascending >= since)
    if until:
        query = query.filter(ascending < until)
    return query


def count_matching(wanted: FailureFilter | SpillFilter, cap: int = MAX_MATCHING) -> int:
    """How many records the filter matches, counting at most ``cap`` (keys only)."""
    return wanted.query().count(limit=cap)


def _matching_ids(wanted: FailureFilter | SpillFilter) -> list[str]:
    keys = wanted.query().fetch(MAX_MATCHING, keys_only=True)
    return [key.id() for key in keys]


# -- spilled payloads ---------------------------------------------------------------------


def list_spillover(
    wanted: SpillFilter | None = None, *, cursor: str | None = None, limit: int = PAGE_SIZE
) -> Page:
    """One page of spilled-payload records (never their chunks) that ``wanted`` matches."""
    wanted = wanted or SpillFilter()
    return _fetch_page(wanted.query(), wanted.scope(), cursor, limit)


def get_spillover(payload_id: str) -> spillover.DeferredPayload:
    """The record (one Lookup, no chunks); NotFound when there is none."""
    record = spillover.get(_key_name(payload_id, "spilled payload"))
    if record is None:
        raise NotFound(f"no spilled payload with id {payload_id!r}")
    return record


def spillover_json(record: spillover.DeferredPayload, *, detail: bool = False) -> dict[str, Any]:
    """The API view of a record: DESIGN.md's fields plus eta, updated (and ``meta`` in detail)."""
    data = {
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
    if detail:
        data["meta"] = record.meta or {}
        data["deferred_by"] = deferred_by(record.meta)
    return data


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


def _spillover_action(action: str, actor: str, version: str | None) -> Callable[[str], object]:
    if action == "retrigger":
        routing = _check_version(version)
        return lambda payload_id: retrigger_spillover(
            payload_id, actor, version=routing.get("version")
        )
    if action == "delete":
        return lambda payload_id: delete_spillover(payload_id, actor)
    raise BadRequest("action must be retrigger or delete")


def bulk_spillover(
    action: str, ids: Iterable[str], actor: str, *, version: str | None = None
) -> BulkResult:
    """Retrigger or delete several records; each id succeeds or fails on its own."""
    return _bulk(ids, _spillover_action(action, actor, version))


def bulk_spillover_matching(
    action: str, wanted: SpillFilter, actor: str, *, version: str | None = None
) -> BulkResult:
    """Retrigger or delete every record ``wanted`` matches, up to MAX_MATCHING (audited once
    more as a whole, with the filter)."""
    one = _spillover_action(action, actor, version)
    return _bulk_matching(action, wanted, actor, "spillover", one)


def _bulk(ids: Iterable[str], one: Callable[[str], object]) -> BulkResult:
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise BadRequest("select at least one record")
    if len(unique) > MAX_BULK:
        raise BadRequest(f"at most {MAX_BULK} records per bulk action")
    return _apply(unique, one)


def _apply(ids: list[str], one: Callable[[str], object]) -> BulkResult:
    result = BulkResult([], {})
    for record_id in ids:
        try:
            one(record_id)
        except (AdminError, Error) as exc:
            result.errors[record_id] = str(exc)
        else:
            result.done.append(record_id)
    return result


def _bulk_matching(
    action: str,
    wanted: FailureFilter | SpillFilter,
    actor: str,
    what: str,
    one: Callable[[str], object],
) -> BulkResult:
    ids = _matching_ids(wanted)
    if not ids:
        raise NotFound(f"no {what} record matches {wanted.describe()}")
    result = BulkResult([], {})
    for start in range(0, len(ids), MAX_BULK):
        batch = _apply(ids[start : start + MAX_BULK], one)
        result.done += batch.done
        result.errors.update(batch.errors)
    audit.record(
        actor,
        f"bulk {action}",
        f"{what}?{json.dumps(wanted.params(), sort_keys=True)}",
        f"{wanted.describe()}: {result.summary} (at most {MAX_MATCHING})",
    )
    return result


# -- failures -----------------------------------------------------------------------------


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
    """The API view of a failure: DESIGN.md's fields plus group, payload_id, retriggered
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
        "payload_id": record.payload_id,
        "retriggered": record.retriggered or 0,
        "retriggerable": record.state in failures.RETRIGGERABLE,
    }
    if detail:
        data["meta"] = record.meta or {}
        data["deferred_by"] = deferred_by(record.meta)
    return data


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


def _failure_action(action: str, actor: str, version: str | None) -> Callable[[str], object]:
    if action == "retrigger":
        routing = _check_version(version)
        return lambda record_id: retrigger_failure(record_id, actor, version=routing.get("version"))
    if action == "dismiss":
        return lambda record_id: dismiss_failure(record_id, actor)
    if action == "delete":
        return lambda record_id: delete_failure(record_id, actor)
    raise BadRequest("action must be retrigger, dismiss or delete")


def bulk_failures(
    action: str, ids: Iterable[str], actor: str, *, version: str | None = None
) -> BulkResult:
    """Retrigger, dismiss or delete several failures by id."""
    return _bulk(ids, _failure_action(action, actor, version))


def bulk_failures_matching(
    action: str, wanted: FailureFilter, actor: str, *, version: str | None = None
) -> BulkResult:
    """Retrigger, dismiss or delete every failure ``wanted`` matches, up to MAX_MATCHING."""
    one = _failure_action(action, actor, version)
    return _bulk_matching(action, wanted, actor, "failures", one)


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


# -- where a task came from ---------------------------------------------------------------


def deferred_by(meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The request that deferred a task (from its envelope header), with a Cloud Logging link.

    ``{"path": "/checkout", "trace_id": "4bf9...", "logs_url": "https://console..."}``, or None
    when the task was deferred outside a request (or by a version that did not record it).
    """
    request = (meta or {}).get("request")
    if not isinstance(request, dict):
        return None
    trace_id = str(request.get("trace_id") or "")
    project = settings().project
    logs_url = None
    if project and trace_id:
        query = f'trace="projects/{project}/traces/{trace_id}"'
        logs_url = (
            "https://console.cloud.google.com/logs/query;query="
            f"{quote(query, safe='')}?project={quote(project, safe='')}"
        )
    return {"path": str(request.get("path") or ""), "trace_id": trace_id, "logs_url": logs_url}


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
    #: Runs per minute over the last hour, all functions: (minute, processed, failed).
    runs_by_minute: list[tuple[datetime.datetime, int, int]]


def overview_json(numbers: Overview, queues: list[QueueInfo]) -> dict[str, Any]:
    """The API view of the overview page."""
    data = dataclasses.asdict(numbers)
    data["failures_by_hour"] = [[_iso(hour), count] for hour, count in numbers.failures_by_hour]
    data["runs_by_minute"] = [
        [_iso(minute), processed, failed] for minute, processed, failed in numbers.runs_by_minute
    ]
    data["queues"] = [queue_json(queue) for queue in queues]
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
    24 h chart: a projection on ``last_seen`` of at most SCAN_CAP records. Runs per minute: one
    Lookup of the metrics of all functions.
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
    runs = metrics.all_functions()
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
        runs_by_minute=[
            (point.start, point.runs, point.failures) for point in runs.by_minute(now.timestamp())
        ],
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


def queue_json(queue: QueueInfo) -> dict[str, Any]:
    """The API view of a queue."""
    return dataclasses.asdict(queue)


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


def _attempt_json(task: tasks_v2.Task, field: str) -> dict[str, Any] | None:
    if field not in task:
        return None
    attempt = getattr(task, field)
    response = None
    if "response_status" in attempt:
        status = attempt.response_status
        response = {"code": status.code, "message": status.message}
    return {
        "dispatch_time": _iso(attempt.dispatch_time) if "dispatch_time" in attempt else None,
        "response_time": _iso(attempt.response_time) if "response_time" in attempt else None,
        "response": response,
    }


def task_json(task: tasks_v2.Task) -> dict[str, Any]:
    """The API view of a Cloud Tasks task (BASIC view: no body, no headers)."""
    last = _attempt_json(task, "last_attempt")
    request = task.app_engine_http_request
    return {
        "name": task.name.rsplit("/", 1)[-1],
        "path": task.name,
        "schedule_time": _iso(task.schedule_time) if "schedule_time" in task else None,
        "create_time": _iso(task.create_time) if "create_time" in task else None,
        "dispatch_count": task.dispatch_count,
        "response_count": task.response_count,
        "last_response": last["response"] if last else None,
        "last_attempt_time": last["dispatch_time"] if last else None,
        "url": request.relative_uri if "app_engine_http_request" in task else None,
    }


def _check_task(queue: str, task: str) -> None:
    check_queue_name(queue)
    if not isinstance(task, str) or not _TASK.match(task):
        raise NotFound(f"no task named {task!r}")


def envelope_summary(body: bytes) -> dict[str, Any] | None:
    """What a task body's envelope header says, unverified and never unpickled: for display.

    None when the body is not a gae_deferred envelope.
    """
    try:
        header = envelope.read_header(body)
    except Error:
        return None
    if not isinstance(header, dict):
        return None
    ref = header.get("ref") if isinstance(header.get("ref"), dict) else None
    created_ms = header.get("created_ms")
    created = (
        datetime.datetime.fromtimestamp(created_ms / 1000, datetime.UTC)
        if isinstance(created_ms, int)
        else None
    )
    return {
        "function": header.get("function"),
        "args": header.get("args"),
        "raw_bytes": header.get("raw_bytes"),
        "body_bytes": header.get("body_bytes"),
        "created": _iso(created),
        "app_version": header.get("app_version"),
        "python": header.get("python"),
        "cloudpickle": header.get("cloudpickle"),
        "serializer": header.get("serializer"),
        "retry": header.get("retry"),
        "spilled": ref is not None,
        "payload_id": str(ref.get("id")) if ref else None,
        "stored_bytes": ref.get("stored_bytes") if ref else None,
        "deferred_by": deferred_by(header),
        "header": header,
    }


def task_detail(queue: str, task: str) -> dict[str, Any]:
    """One queued task in full (GetTask, FULL view): attempts, URL, headers, routing and its
    envelope header. The body's pickle is never loaded."""
    _check_task(queue, task)
    found = _cloud_tasks(lambda: cloud_tasks.get_task(queue, task, full=True))
    request = found.app_engine_http_request
    body = bytes(request.body) if "app_engine_http_request" in found else b""
    routing = request.app_engine_routing if "app_engine_routing" in request else None
    return {
        **task_json(found),
        "queue": queue,
        "first_attempt": _attempt_json(found, "first_attempt"),
        "last_attempt": _attempt_json(found, "last_attempt"),
        "method": request.http_method.name if "app_engine_http_request" in found else None,
        "headers": dict(request.headers) if "app_engine_http_request" in found else {},
        "routing": (
            {"service": routing.service, "version": routing.version, "instance": routing.instance}
            if routing is not None
            else {}
        ),
        "body_bytes": len(body),
        "envelope": envelope_summary(body),
    }


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


# -- metrics ------------------------------------------------------------------------------


def series_json(series: metrics.Series, now: float | None = None) -> dict[str, Any]:
    """The API view of a metrics series: totals of every window, as of ``now``."""
    return {
        "kind": series.kind,
        "name": series.name,
        "queues": series.queues,
        "last_run": _iso(series.last_run),
        "windows": {
            window: dataclasses.asdict(series.window(window, now)) for window in metrics.WINDOWS
        },
    }


def _point_json(point: metrics.Point) -> dict[str, Any]:
    return {**dataclasses.asdict(point), "start": _iso(point.start)}


def _check_window(window: str, sort: str = "runs") -> None:
    if window not in metrics.WINDOWS:
        raise BadRequest(f"window must be one of {', '.join(metrics.WINDOWS)}")
    if sort not in metrics.SORTS:
        raise BadRequest(f"sort must be one of {', '.join(metrics.SORTS)}")


def list_metrics(
    window: str = "24h", sort: str = "runs", *, cursor: str | None = None, limit: int = PAGE_SIZE
) -> dict[str, Any]:
    """One page of functions, most runs (failures, slowest p95) in ``window`` first, with the
    totals of every queue and of all functions.

    One indexed query (``kind``, ``-<sort>_<window>``) for the page; the order is the one the
    last flush or sweep stored, the numbers are as of now.
    """
    _check_window(window, sort)
    model = metrics.DeferredMetricSeries
    query = model.query(model.kind == "function").order(metrics.sort_property(window, sort))
    page = _fetch_page(query, f"metrics|{window}|{sort}", cursor, limit)
    queues = model.query(model.kind == "queue").fetch_async(MAX_PAGE_SIZE)
    now = _now().timestamp()
    return {
        "window": window,
        "sort": sort,
        "items": [series_json(metrics.Series.of(record), now) for record in page.items],
        "next_cursor": page.next_cursor,
        "queues": sorted(
            (series_json(metrics.Series.of(record), now) for record in queues.result()),
            key=lambda queue: queue["name"],
        ),
        "all": series_json(metrics.all_functions(), now),
        "buckets_ms": list(metrics.BUCKETS_MS),
    }


def function_metrics(function: str, window: str = "24h") -> dict[str, Any]:
    """One function's totals and its charts: the last hour by minute, 7 days by hour."""
    _check_window(window)
    series = metrics.get_series("function", function)
    if series is None:
        raise NotFound(f"no runs of {function!r} recorded in the last 8 days")
    now = _now().timestamp()
    return {
        **series_json(series, now),
        "window": window,
        "by_minute": [_point_json(point) for point in series.by_minute(now)],
        "by_hour": [_point_json(point) for point in series.by_hour(now)],
    }


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
