"""The sweeper: finishes what a crash left half done, and purges what has expired.

It runs from cron.yaml (``/_ah/deferred-admin/cron/sweep``), from the dashboard, and on a timer
on the local stack::

    from gae_deferred.sweeper import sweep
    report = sweep()        # SweepReport(reenqueued=1, already_queued=0, purged_payloads=0, ...)

1. A spilled or outboxed payload still ``pending`` well past its ETA never had its task
   created (the process died between the Datastore commit and CreateTask, or CreateTask
   failed): the sweeper creates the task under the record's own name. ALREADY_EXISTS means the
   task is there after all (a paused or backlogged queue; the record is checked again later),
   unless GetTask says it is not: then the name is only held (Cloud Tasks keeps the name of a
   deleted or purged task about an hour, 9 days for queues created from queue.yaml), and the
   task is created under a fresh name, which the record takes first. Nothing waits for a name
   to come free. The repair is noted on the record in a transaction, and only if the record is
   still the one the sweep read: a task that ran (or failed) meanwhile stays done.
2. Dead letters and permanent failures older than the retention period are deleted, with
   their payloads, and so are the done markers of spilled tasks older than a week, and the
   chunks of payloads whose write never finished (a process that died between the commits of
   a payload over ``commit_bytes``, before its record; a transaction that never committed),
   an hour after it started.
3. iterate() jobs that ended (done or cancelled) longer ago than the retention period are
   deleted with their shards, skipped-entity records and once_per_entity markers, a batch of
   records per job and sweep.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb

from . import cloud_tasks, enqueue, failures, iteration, metrics, spillover
from ._config import settings
from ._datastore import ndb_context
from .errors import DeferError, TaskAlreadyExistsError
from .failures import FailureState
from .spillover import PayloadState

logger = logging.getLogger("gae_deferred")

_FINISHED_FAILURES = (
    FailureState.PERMANENT,
    FailureState.DEAD,
    FailureState.RESOLVED,
    FailureState.DISMISSED,
)


@dataclasses.dataclass
class SweepReport:
    """What one sweep did."""

    reenqueued: int = 0
    already_queued: int = 0
    #: Records whose task ran or failed while the sweep re-created it: left as they are.
    finished_meanwhile: int = 0
    purged_payloads: int = 0
    purged_failures: int = 0
    purged_done_markers: int = 0
    #: Payloads whose write never finished (a crash between commits): their chunks deleted.
    purged_unfinished: int = 0
    #: Metrics series whose window totals aged, and series quiet for 8 days (deleted).
    refreshed_metrics: int = 0
    purged_metrics: int = 0
    #: iterate() jobs past their retention, and their records (markers, shards, failures).
    purged_jobs: int = 0
    purged_job_records: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


def sweep(now: datetime.datetime | None = None, batch: int = 200) -> SweepReport:
    """One pass: re-enqueue stuck payloads, purge expired dead letters, done markers and
    unfinished writes; reads at most 5 batches (and the records of unfinished writes)."""
    now = now or spillover.now()
    report = SweepReport()
    with ndb_context():
        _reenqueue_stuck(now, batch, report)
        _purge_expired(now, batch, report)
        report.purged_jobs, report.purged_job_records = iteration.purge_ended_jobs(now, batch)
        report.refreshed_metrics, report.purged_metrics = metrics.maintain(now, batch)
    if report.reenqueued or report.errors:
        logger.warning("sweeper: %s", report)
    return report


def _reenqueue_stuck(now: datetime.datetime, batch: int, report: SweepReport) -> None:
    cutoff = now - datetime.timedelta(seconds=settings().sweep_grace_seconds)
    query = spillover.DeferredPayload.query(
        spillover.DeferredPayload.state == PayloadState.PENDING,
        spillover.DeferredPayload.eta < cutoff,
    )
    for record in query.fetch(batch):
        try:
            _repair(record, now, report)
        except (DeferError, api_exceptions.GoogleAPIError) as exc:
            report.errors.append(f"{record.key.id()}: {exc}")


def _repair(record: spillover.DeferredPayload, now: datetime.datetime, report: SweepReport) -> None:
    """Create the task of one stuck record, then note the repair on the record (if it is still
    the record that was read)."""
    try:
        # Due right away: ``now`` is the sweep's clock for what is stuck, and a clock set
        # ahead (a test, a late cron) must not push the repaired task into the future.
        enqueue.enqueue_record(record)
    except TaskAlreadyExistsError:
        if _task_exists(record):
            report.already_queued += 1
            _note(record, now, report)
            return
        # The name is held by a task that was deleted or purged: Cloud Tasks keeps a name
        # about an hour (9 days for queue.yaml queues). A fresh name, which the record takes
        # first: a task under a name the record does not know would not run it.
        fresh = cloud_tasks.new_task_name("s")
        if not _note(record, now, report, task_name=fresh):
            return
        enqueue.enqueue_record(record, name=fresh)
        report.reenqueued += 1
        return
    report.reenqueued += 1
    _note(record, now, report)


def _note(
    record: spillover.DeferredPayload,
    now: datetime.datetime,
    report: SweepReport,
    task_name: str | None = None,
) -> bool:
    """Write the sweep's changes to the record as it is now, in a transaction, and only if it
    is still the pending record that was read: the task just created may already have run
    (deleting it) or failed (changing its state), and an old copy written back would bring a
    finished record back as pending for ever. False when it changed meanwhile (left alone)."""
    read_updated = record.updated

    def update() -> bool:
        current = record.key.get(use_cache=False, use_global_cache=False)
        if (
            current is None
            or current.state != PayloadState.PENDING
            or current.updated != read_updated
        ):
            return False
        # Look again only after another grace period, not on every sweep.
        current.populate(eta=now, updated=now)
        if task_name:
            current.task_name = task_name
        current.put()
        return True

    if ndb.transaction(update):
        return True
    report.finished_meanwhile += 1
    return False


def _task_exists(record: spillover.DeferredPayload) -> bool:
    try:
        cloud_tasks.get_task(record.queue, record.task_name)
    except api_exceptions.NotFound:
        return False
    return True


def _purge_expired(now: datetime.datetime, batch: int, report: SweepReport) -> None:
    cutoff = now - datetime.timedelta(seconds=settings().dead_letter_retention_seconds)
    records = spillover.DeferredPayload.query(
        spillover.DeferredPayload.state.IN([PayloadState.PERMANENT, PayloadState.DEAD]),
        spillover.DeferredPayload.updated < cutoff,
    ).fetch(batch)
    doomed: list[ndb.Key] = []
    for record in records:
        doomed += [record.key, *spillover.chunk_keys(record.key.id(), record.chunks or 0)]
    report.purged_payloads = len(records)
    failure_keys = failures.DeferredFailure.query(
        failures.DeferredFailure.state.IN(list(_FINISHED_FAILURES)),
        failures.DeferredFailure.last_seen < cutoff,
    ).fetch(batch, keys_only=True)
    for key in failure_keys:
        doomed += [key, failures.payload_key(key.id())]
    report.purged_failures = len(failure_keys)
    # A group that has not failed for the whole retention period has no failures left to list.
    doomed += failures.DeferredFailureGroup.query(
        failures.DeferredFailureGroup.last_seen < cutoff
    ).fetch(batch, keys_only=True)
    done_cutoff = now - datetime.timedelta(days=spillover.DONE_MARKER_DAYS)
    done_markers = spillover.DeferredPayloadDone.query(
        spillover.DeferredPayloadDone.done < done_cutoff
    ).fetch(batch, keys_only=True)
    report.purged_done_markers = len(done_markers)
    doomed += done_markers
    if doomed:
        ndb.delete_multi(doomed)
    report.purged_unfinished = spillover.purge_unfinished(now, batch)
