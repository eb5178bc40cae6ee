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
   task is created under a fresh name, which the record follows. Nothing waits for a name to
   come free.
2. Dead letters and permanent failures older than the retention period are deleted, with
   their payloads, and so are the done markers of spilled tasks older than a week, and the
   chunks of payloads whose write never finished (a process that died between the commits of
   a payload over ``commit_bytes``, before its record; a transaction that never committed),
   an hour after it started.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb

from . import cloud_tasks, enqueue, failures, metrics, spillover
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
    purged_payloads: int = 0
    purged_failures: int = 0
    purged_done_markers: int = 0
    #: Payloads whose write never finished (a crash between commits): their chunks deleted.
    purged_unfinished: int = 0
    #: Metrics series whose window totals aged, and series quiet for 8 days (deleted).
    refreshed_metrics: int = 0
    purged_metrics: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


def sweep(now: datetime.datetime | None = None, batch: int = 200) -> SweepReport:
    """One pass: re-enqueue stuck payloads, purge expired dead letters, done markers and
    unfinished writes; reads at most 5 batches (and the records of unfinished writes)."""
    now = now or spillover.now()
    report = SweepReport()
    with ndb_context():
        _reenqueue_stuck(now, batch, report)
        _purge_expired(now, batch, report)
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
    touched = []
    for record in query.fetch(batch):
        try:
            # Due right away: ``now`` is the sweep's clock for what is stuck, and a clock set
            # ahead (a test, a late cron) must not push the repaired task into the future.
            enqueue.enqueue_record(record)
        except TaskAlreadyExistsError:
            try:
                if _task_exists(record):
                    report.already_queued += 1
                else:
                    # The name is held by a task that was deleted or purged: Cloud Tasks keeps
                    # a name about an hour (9 days for queue.yaml queues). A fresh name now.
                    enqueue.enqueue_record(record, name=cloud_tasks.new_task_name("s"))
                    report.reenqueued += 1
            except (DeferError, api_exceptions.GoogleAPIError) as exc:
                report.errors.append(f"{record.key.id()}: {exc}")
                continue
        except DeferError as exc:
            report.errors.append(f"{record.key.id()}: {exc}")
            continue
        else:
            report.reenqueued += 1
        # Look again only after another grace period, not on every sweep.
        record.eta = now
        record.updated = now
        touched.append(record)
    if touched:
        ndb.put_multi(touched)


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
