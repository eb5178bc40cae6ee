"""Spilled payloads on the dashboard: list, detail, retrigger, delete, in bulk."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from google.api_core import exceptions as api_exceptions

from .. import audit, cloud_tasks, enqueue, spillover
from ..errors import (
    NotFound,
)
from ..spillover import PayloadState
from ._common import (
    PAGE_SIZE,
    BulkResult,
    Page,
    _bulk,
    _check_version,
    _cloud_tasks,
    _fetch_page,
    _iso,
    _key_name,
    _now,
    choose_action,
    deferred_by,
)
from .filters import (
    SpillFilter,
    _bulk_matching,
)
from .header import header_rows


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
    """The API view of a record: docs/design.md's fields, eta and updated (``meta`` in detail)."""
    data = {
        "id": record.key.id(),
        "function": record.function,
        "queue": record.queue,
        "namespace": record.namespace,
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
        data["header"] = header_rows(record.meta)
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
    deletes = _Deletes(actor)
    deletes(payload_id)
    deletes.finish()


class _Deletes:
    """Spilled records deleted one by one (record and chunks), then their queued tasks together:
    BatchDeleteTasks calls per queue (``cloud_tasks.delete_tasks``), one for up to 1,000."""

    def __init__(self, actor: str) -> None:
        self.actor = actor
        self._queued: list[spillover.DeferredPayload] = []

    def __call__(self, payload_id: str) -> None:
        record = get_spillover(payload_id)
        spillover.delete(record.key.id(), record.chunks or 0)
        if record.task_name and record.queue:
            # Without the payload the task could only fail as "spilled payload missing".
            self._queued.append(record)
        else:
            audit.record(self.actor, "delete", f"spillover/{payload_id}", record.function or "")

    def finish(self) -> None:
        by_queue: dict[str, list[spillover.DeferredPayload]] = {}
        for record in self._queued:
            by_queue.setdefault(record.queue, []).append(record)
        for queue, records in by_queue.items():
            errors = cloud_tasks.delete_tasks(queue, [record.task_name for record in records])
            for record, error in zip(records, errors, strict=True):
                # Gone already (it ran, or was deleted) is what was wanted.
                kept = error is not None and not isinstance(error, _TASK_GONE)
                note = "queued task not deleted" if kept else record.function or ""
                audit.record(self.actor, "delete", f"spillover/{record.key.id()}", note)
        self._queued = []


_TASK_GONE = (api_exceptions.NotFound, api_exceptions.InvalidArgument)


def _spillover_action(action: str, actor: str, version: str | None) -> Callable[[str], object]:
    if action == "delete":
        return _Deletes(actor)
    actions = {"retrigger": retrigger_spillover, "delete": delete_spillover}
    return choose_action(action, actions, actor, version)


def bulk_spillover(
    action: str, ids: Iterable[str], actor: str, *, version: str | None = None
) -> BulkResult:
    """Retrigger or delete several records; each id succeeds or fails on its own (a delete's
    queued tasks go in BatchDeleteTasks calls once the records are gone)."""
    one = _spillover_action(action, actor, version)
    result = _bulk(ids, one)
    if isinstance(one, _Deletes):
        one.finish()
    return result


def bulk_spillover_matching(
    action: str,
    wanted: SpillFilter,
    actor: str,
    *,
    version: str | None = None,
    expected: int | None = None,
) -> BulkResult:
    """Retrigger or delete every record ``wanted`` matches, up to MAX_MATCHING (audited once
    more as a whole, with the filter); with ``expected``, only if exactly that many match."""
    one = _spillover_action(action, actor, version)
    try:
        return _bulk_matching(action, wanted, actor, "spillover", one, expected)
    finally:
        if isinstance(one, _Deletes):
            one.finish()
