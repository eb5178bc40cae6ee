"""The sweeper purges iterate() jobs that ended longer ago than the retention period, with
their shards, skipped-entity records and once_per_entity markers (Datastore emulator, real
ndb client, capture_tasks() running the job)."""

from __future__ import annotations

import contextlib
import datetime

import gae_deferred
from gae_deferred import idempotency, iteration, sweeper
from gae_deferred._config import settings
from gae_deferred.testing import capture_tasks
from tests.iteration import jobs_support
from tests.iteration.jobs_support import Item, make_items

RETENTION = datetime.timedelta(seconds=settings().dead_letter_retention_seconds)


def _records_of(job_id: str) -> tuple[int, int, int]:
    """(markers, skipped-entity records, shards) the job has in Datastore."""
    markers = [
        key
        for key in idempotency.DeferredDone.query().fetch(keys_only=True)
        if key.id().startswith(f"{job_id}:")
    ]
    return (
        len(markers),
        len(iteration.job_failures(job_id)),
        len(iteration.job_shards(job_id)),
    )


def _run_until_empty(queue) -> None:
    while queue.tasks:
        with contextlib.suppress(ValueError):  # the poisoned entity, until it is skipped
            queue.run_all()


def test_a_done_job_is_purged_with_its_records_after_the_retention_period(ndb_emulator):
    make_items(40, poison=frozenset({7}))
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(), jobs_support.bump_once, batched=True, shards=2, batch_size=10
        )
        _run_until_empty(queue)
        # A job still running has no purge_at (null, which sorts before every date).
        other = iteration.DeferredJob(id="running", state="running", finished=None)
        other.put()
        ended = iteration.get_job(job.id)
        assert ended.state == "done"
        assert ended.purge_at == ended.finished + RETENTION
        assert iteration.get_job("running").purge_at is None
        assert _records_of(job.id) == (39, 1, 2)

        early = sweeper.sweep(now=ended.purge_at - datetime.timedelta(seconds=1))
        assert early.purged_jobs == 0
        assert iteration.get_job(job.id) is not None

        report = sweeper.sweep(now=ended.purge_at + datetime.timedelta(days=365))
    assert (report.purged_jobs, report.purged_job_records) == (1, 39 + 1 + 2 + 1)
    assert iteration.get_job(job.id) is None
    assert _records_of(job.id) == (0, 0, 0)
    assert iteration.get_job("running").state == "running"
    assert len(Item.query().fetch()) == 40  # the entities a job walked stay


def test_a_big_job_is_purged_a_batch_a_sweep_and_a_cancelled_job_too(ndb_emulator):
    make_items(30)
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(), jobs_support.bump_once, batched=True, shards=1, batch_size=10
        )
        queue.run_all()
        cancelled = gae_deferred.iterate(Item.query(), jobs_support.bump, shards=1)
        gae_deferred.cancel_job(cancelled.id)
        queue.run_all()
        assert _records_of(job.id) == (30, 0, 1)
        later = iteration.get_job(job.id).purge_at + datetime.timedelta(days=1)
        assert iteration.get_job(cancelled.id).state == "cancelled"
        reports = [sweeper.sweep(now=later, batch=12) for _ in range(3)]
    # Sweep 1: 12 markers of the done job, and the cancelled job (nothing planned) whole;
    # sweep 2: 12 more markers; sweep 3: the last 6, the shard and the job.
    assert [(r.purged_jobs, r.purged_job_records) for r in reports] == [(1, 13), (0, 12), (1, 8)]
    assert iteration.get_job(job.id) is None and iteration.get_job(cancelled.id) is None
    assert _records_of(job.id) == (0, 0, 0)
