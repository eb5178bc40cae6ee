"""What the dashboard's modules share: pages, ids in URLs, cursors, bulk actions, errors."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb

from .. import cloud_tasks, defaults, failures, spillover
from .._config import settings
from .._model import is_key_name
from .._signing import derive_key
from ..errors import (
    AdminError,
    BadRequest,
    Conflict,
    Error,
    NotFound,
    QueueNotFoundError,
    Unavailable,
)
from ..failures import FailureState

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
#: Failure, spillover and audit lists count their records up to here (keys only, one count
#: query per page view); beyond it they say "more than 100". Counting reads the keys it
#: counts: a higher cap makes a page of a big list cost more (make bench's Dashboard scaling).
LIST_COUNT_CAP = 100
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

_QUEUE = cloud_tasks.QUEUE_NAME
_TASK = cloud_tasks.TASK_NAME
_VERSION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_PAGE_TOKEN = re.compile(r"^[A-Za-z0-9_=+/.-]{1,2000}$")
#: Ids that travel in a URL path segment as they are: no leading dot, so never "." or "..".
_URL_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,499}$")
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


#: Where the dashboard is mounted: links made here point there.
PREFIX = defaults.ADMIN_PREFIX


def url_segment(value: str) -> str:
    """:func:`url_id` percent-encoded: one path segment of a link."""
    return quote(url_id(value), safe="")


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
    """Any id Datastore can hold, odd ones included: they are looked up, never trusted. One it
    cannot hold (over 1,500 bytes, ``__x__``) is NotFound before any RPC: Datastore would refuse
    even to look it up."""
    if not is_key_name(value):
        shown = value[:200] + "..." if isinstance(value, str) and len(value) > 200 else value
        raise NotFound(f"no {what} with id {shown!r}")
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
    # Local mode has no Cloud Logging: a link there would open an empty console page.
    if project and trace_id and not settings().local_mode:
        query = f'trace="projects/{project}/traces/{trace_id}"'
        logs_url = (
            "https://console.cloud.google.com/logs/query;query="
            f"{quote(query, safe='')}?project={quote(project, safe='')}"
        )
    return {
        "path": str(request.get("path") or ""),
        "trace_id": trace_id,
        "logs_url": logs_url,
        "local_logs": f"[trace {trace_id[:8]}]" if trace_id and settings().local_mode else None,
    }


def format_bytes(size: int | None) -> str:
    """``"1.5 MiB"``, ``"128 KiB"``, ``"12 B"``; ``"-"`` for None."""
    if size is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} B"


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


def choose_action(
    action: str, actions: Mapping[str, Callable[..., object]], actor: str, version: str | None
) -> Callable[[str], object]:
    """The one-record action a bulk request names, bound to its actor (and, for a retrigger,
    the App Engine version to send the tasks to); BadRequest for an action not in ``actions``."""
    if action not in actions:
        raise BadRequest(f"action must be {', '.join(actions)}")
    chosen = actions[action]
    if action == "retrigger":
        target = _check_version(version).get("version")
        return lambda record_id: chosen(record_id, actor, version=target)
    return lambda record_id: chosen(record_id, actor)
