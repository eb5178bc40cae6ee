"""The failure registry: one record per task that failed, updated on every failed attempt.

States: ``retrying`` (Cloud Tasks will try again), ``permanent`` (PermanentTaskFailure or a payload
that cannot load: not retried), ``dead`` (the last allowed attempt failed), ``resolved`` (a later
attempt succeeded), ``dismissed`` (an admin cleared it). The payload stays retriggerable: an
inline payload in a ``_DeferredFailurePayload`` child, a spilled one in its spillover record::

    record = failures.get(failure_id)
    record.traceback, record.attempts, record.state
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import re

from google.cloud import ndb

from . import _facets
from ._model import MAX_INDEXED_CHARS, DeferredModel, root_key


class FailureState(enum.StrEnum):
    """Where a failed task stands; a spilled payload's state uses the same words."""

    RETRYING = "retrying"
    PERMANENT = "permanent"
    DEAD = "dead"
    RESOLVED = "resolved"
    DISMISSED = "dismissed"


#: States whose payload an admin may retrigger.
RETRIGGERABLE = (FailureState.RETRYING, FailureState.PERMANENT, FailureState.DEAD)
_MAX_MESSAGE_CHARS = 4000
_MAX_TRACEBACK_CHARS = 64_000


class DeferredFailure(DeferredModel):
    """Failures of one task: what raised, how often, and where its payload is kept."""

    function = ndb.StringProperty()
    exception_type = ndb.StringProperty()
    #: "function|exception_type": failures are grouped by it on the dashboard.
    group = ndb.StringProperty()
    message = ndb.TextProperty()
    traceback = ndb.TextProperty()
    attempts = ndb.IntegerProperty(default=0)
    state = ndb.StringProperty(choices=list(FailureState))
    first_seen = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    last_seen = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    task_name = ndb.StringProperty()
    queue = ndb.StringProperty()
    #: The spillover record holding the payload, or None when a FailurePayload child holds it.
    payload_id = ndb.StringProperty()
    retriggered = ndb.IntegerProperty(default=0)
    #: The envelope header, for display: function, args preview, versions.
    meta = ndb.JsonProperty(indexed=False)
    #: Retrying, permanent or dead: what the dashboard's "active" view counts per group.
    active = ndb.ComputedProperty(lambda record: record.state in RETRIGGERABLE)
    #: Search tokens (state, queue, function prefixes, exception type, message words): the
    #: dashboard's filters are equality filters on this list (see _facets).
    facets = ndb.ComputedProperty(lambda record: record.search_tokens(), repeated=True)
    #: -last_seen in ms: "newest first within a time range" is an inequality on this alone
    #: (an inequality is ordered by its property on every backend; see admin.FailureFilter).
    seen_desc = ndb.ComputedProperty(lambda record: _facets.descending_ms(record.last_seen))

    @property
    def id(self) -> str:
        return self.key.id()

    @property
    def namespace(self) -> str:
        """The Datastore namespace the task runs in (``""``: the default one)."""
        return str((self.meta or {}).get("namespace") or "")

    def search_tokens(self) -> list[str]:
        """The ``facets`` of this record; ``state:active`` marks the retriggerable states."""
        tokens = _facets.facets(
            state=self.state,
            queue=self.queue,
            function=self.function,
            exception_type=self.exception_type,
            message=self.message,
            namespace=self.namespace,
        )
        return [*tokens, "state:active"] if self.state in RETRIGGERABLE else tokens


class DeferredFailurePayload(DeferredModel):
    """The inline envelope of a failed task, kept so the task can be retriggered."""

    data = ndb.BlobProperty(indexed=False)


class DeferredFailureGroup(DeferredModel):
    """One per function + exception type: when it last failed. Rewritten with every failure,
    so the dashboard lists groups a page at a time instead of scanning failures."""

    group = ndb.StringProperty()
    function = ndb.TextProperty()
    exception_type = ndb.TextProperty()
    last_seen = ndb.DateTimeProperty(tzinfo=datetime.UTC)


def group_entity(record: DeferredFailure) -> DeferredFailureGroup:
    """The group marker for a failure record, to write in the same batch."""
    digest = hashlib.sha256(record.group.encode()).hexdigest()[:32]
    return DeferredFailureGroup(
        key=root_key(DeferredFailureGroup, f"g-{digest}"),
        group=record.group,
        function=record.function,
        exception_type=record.exception_type,
        last_seen=record.last_seen,
    )


def failure_id(queue: str, task_name: str) -> str:
    """Record id for a task; hashed so any task name makes a short, URL-safe key."""
    digest = hashlib.sha256(f"{queue}/{task_name}".encode()).hexdigest()[:32]
    return f"f-{digest}"


_GENERATED_ID = re.compile(r"^f-[0-9a-f]{32}$")


def is_generated_id(record_id: str) -> bool:
    """Whether ``record_id`` has the form :func:`failure_id` makes (older versions took ids from
    a request header; such records can be shown and deleted, never handed to a new task)."""
    return bool(_GENERATED_ID.match(record_id))


def failure_key(record_id: str) -> ndb.Key:
    return root_key(DeferredFailure, record_id)


def payload_key(record_id: str) -> ndb.Key:
    return ndb.Key(DeferredFailurePayload, 1, parent=failure_key(record_id))


def get(record_id: str) -> DeferredFailure | None:
    return failure_key(record_id).get()


def get_payload(record_id: str) -> bytes | None:
    kept = payload_key(record_id).get()
    return kept.data if kept else None


def update(
    existing: DeferredFailure | None,
    record_id: str,
    *,
    function: str,
    exception_type: str,
    message: str,
    traceback: str,
    state: FailureState,
    task_name: str,
    queue: str,
    meta: dict | None,
    payload_id: str | None,
    when: datetime.datetime,
) -> DeferredFailure:
    """The failure record after one more failed attempt (not written: the caller batches puts)."""
    record = existing or DeferredFailure(key=failure_key(record_id), first_seen=when, attempts=0)
    function = function[:MAX_INDEXED_CHARS]
    exception_type = exception_type[:MAX_INDEXED_CHARS]
    record.populate(
        function=function,
        exception_type=exception_type,
        group=f"{function}|{exception_type}"[:MAX_INDEXED_CHARS],
        message=message[:_MAX_MESSAGE_CHARS],
        traceback=traceback[-_MAX_TRACEBACK_CHARS:],
        attempts=(record.attempts or 0) + 1,
        state=state,
        last_seen=when,
        task_name=task_name[:MAX_INDEXED_CHARS],
        # Both come from request headers; the record id hashes the full values.
        queue=queue[:MAX_INDEXED_CHARS],
        meta=meta,
        payload_id=payload_id,
    )
    return record


def kept_payload(record_id: str, envelope: bytes) -> DeferredFailurePayload:
    return DeferredFailurePayload(key=payload_key(record_id), data=envelope)


def resolve(record_id: str) -> bool:
    """Mark a task's failure record resolved after a successful run; False if there is none."""
    record = get(record_id)
    if record is None or record.state == FailureState.RESOLVED:
        return False
    record.state = FailureState.RESOLVED
    record.last_seen = datetime.datetime.now(datetime.UTC)
    record.put()
    return True
