"""iterate() on the Datastore emulator (gRPC, real ndb client), run by capture_tasks()."""

from __future__ import annotations

import datetime
import random
import threading
import time

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import ndb

import gae_deferred
from gae_deferred import admin, iteration
from gae_deferred.context import TaskInfo
from gae_deferred.testing import capture_tasks
from tests.iteration import jobs_support
from tests.iteration.jobs_support import Item, Outcome, make_items


def _seen() -> dict[int, int]:
    return {item.key.id(): item.seen for item in Item.query().fetch()}


def _run_some(queue, count: int) -> None:
    """Run the first ``count`` queued tasks, one at a time, as Cloud Tasks would."""
    for _ in range(count):
        queue.run(queue.tasks[0])


def _run_until_empty(queue, expected: type[BaseException]) -> int:
    """run_all() until no task is left, counting the attempts that raised ``expected``."""
    raised = 0
    while queue.tasks:
        try:
            queue.run_all()
        except expected:
            raised += 1
    return raised


def test_10000_entities_over_8_shards_each_processed_exactly_once(ndb_emulator_process):
    keys = jobs_support.seed_items(10_000)
    assert Item.get_by_id(10_000).group == "a"
    jobs_support.VISITS.clear()
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(),
            jobs_support.visit_batch,
            batched=True,
            shards=8,
            batch_size=500,
            finalize=jobs_support.record_totals,
            name="ten thousand",
        )
        queue.run_all()
    assert set(jobs_support.VISITS) == {key.id() for key in keys}
    assert set(jobs_support.VISITS.values()) == {1}
    record = iteration.get_job(job.id)
    assert (record.state, record.finalize_state) == ("done", "ok")
    assert (record.processed, record.failed, record.shards) == (10_000, 0, 8)
    shards = iteration.job_shards(job.id)
    assert [shard.processed for shard in shards] == [1250] * 8
    outcome = Outcome.get_by_id(job.id)
    assert (outcome.processed, outcome.failed, outcome.shards, outcome.calls) == (10_000, 0, 8, 1)


def test_once_per_entity_writes_each_entity_once(ndb_emulator):
    make_items(300)
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(), jobs_support.bump_once, batched=True, shards=4, batch_size=50
        )
        queue.run_all()
    assert set(_seen().values()) == {1}
    markers = iteration.DeferredDone.query().fetch(keys_only=True)
    assert len(markers) == 300
    assert all(marker.id().startswith(f"{job.id}:") for marker in markers)


def test_each_entity_once_per_entity_and_the_equality_filter_is_kept(ndb_emulator):
    make_items(300, group="a")
    make_items(120, group="b")
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(Item.group == "b"), jobs_support.bump, shards=3, batch_size=7
        )
        queue.run_all()
    seen = [(item.group, item.seen) for item in Item.query().fetch()]
    assert seen.count(("b", 1)) == 120
    assert seen.count(("a", 0)) == 300
    record = iteration.get_job(job.id)
    assert (record.state, record.processed, record.finalize_state) == ("done", 120, None)


def test_the_querys_namespace_and_ancestor_are_kept(ndb_emulator):
    elsewhere = ndb.put_multi([Item(namespace="tenant-b") for _ in range(30)])
    parent = ndb.Key("Folder", "f1")
    children = ndb.put_multi([Item(parent=parent) for _ in range(20)])
    make_items(25)
    with capture_tasks() as queue:
        gae_deferred.iterate(Item.query(namespace="tenant-b"), jobs_support.bump, shards=3)
        gae_deferred.iterate(Item.query(ancestor=parent), jobs_support.bump, shards=2)
        queue.run_all()
    assert {key.get().seen for key in elsewhere + children} == {1}
    assert set(_seen().values()) == {0, 1}
    assert sum(_seen().values()) == 20


def test_a_job_started_in_a_namespace_walks_it_and_keeps_its_records_in_the_default(
    ndb_emulator,
):
    tenant = ndb.put_multi([Item(namespace="tenant-a") for _ in range(25)])
    make_items(10)
    with capture_tasks() as queue:
        with ndb.get_context().new(namespace="tenant-a").use():
            job = gae_deferred.iterate(
                Item.query(), jobs_support.bump_once, batched=True, shards=2, batch_size=10
            )
        queue.run_all()
    assert {key.get().seen for key in tenant} == {1}
    assert set(_seen().values()) == {0}
    assert iteration.DeferredJob.query(namespace="").fetch(keys_only=True) == [
        iteration._job_key(job.id)
    ]
    assert iteration.get_job(job.id).processed == 25
    assert len(iteration.DeferredDone.query(namespace="").fetch(keys_only=True)) == 25
    assert [job.id] == [listed.id for listed in admin.list_jobs().items]


def test_a_transactional_start_in_a_namespace_joins_the_callers_transaction(ndb_emulator):
    tenant = ndb.put_multi([Item(namespace="tenant-a") for _ in range(5)])
    with capture_tasks() as queue:

        def start(fail):
            job = gae_deferred.iterate(Item.query(), jobs_support.bump, _transactional=True)
            if fail:
                raise RuntimeError("rolled back")
            return job

        with ndb.get_context().new(namespace="tenant-a").use():
            with pytest.raises(RuntimeError):
                ndb.transaction(lambda: start(True))
            job = ndb.transaction(lambda: start(False))
        assert iteration.DeferredJob.query(namespace="").fetch(keys_only=True) == [
            iteration._job_key(job.id)
        ]
        queue.run_all()
    assert {key.get().seen for key in tenant} == {1}


def test_a_task_past_its_time_budget_hands_over_to_the_next_with_the_cursor(ndb_emulator):
    make_items(200)
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(), jobs_support.bump, shards=2, batch_size=10, time_budget=0.001
        )
        ran = queue.run_all()
    assert set(_seen().values()) == {1}
    shards = iteration.job_shards(job.id)
    # Each task does one batch of ten, then hands over: ten full batches per shard, and an
    # eleventh task that finds nothing left.
    assert [(shard.processed, shard.batches, shard.tasks) for shard in shards] == [
        (100, 10, 10)
    ] * 2
    assert ran == 1 + 2 * 11


def _deliver_after_the_deadline(task) -> None:
    """Cloud Tasks delivers a task again when the attempt that died got no answer within the
    task deadline; until then the dead run's claim (a lease of task_deadline_seconds, which the
    test set to 1) answers a delivery 503, retried later."""
    info = TaskInfo(name=task.name, queue=task.queue, retry_count=1, execution_count=1)
    assert gae_deferred.execute_task(task.payload, info).status == 503
    time.sleep(1.5)
    assert gae_deferred.execute_task(task.payload, info).status == 200


def test_a_shard_killed_mid_batch_resumes_from_its_last_committed_key(ndb_emulator):
    keys = make_items(100)
    jobs_support.DIE_AT.clear()
    jobs_support.DIE_AT.add(keys[34].id())  # the 5th entity of the 4th batch of ten
    with capture_tasks() as queue:
        job = gae_deferred.iterate(Item.query(), jobs_support.bump_or_die, shards=1, batch_size=10)
        _run_some(queue, 1)  # the planning task
        [task] = queue.tasks
        gae_deferred.configure(task_deadline_seconds=1)
        with pytest.raises(jobs_support.Killed):
            queue.run(task)
        assert not queue.tasks
        assert iteration.job_shards(job.id)[0].last == keys[29]
        _deliver_after_the_deadline(task)
    seen = _seen()
    # At least once: the four entities of the killed batch done before it died ran twice.
    assert [seen[key.id()] for key in keys[30:34]] == [2, 2, 2, 2]
    assert {seen[key.id()] for key in keys[:30] + keys[34:]} == {1}
    assert iteration.get_job(job.id).processed == 100


def test_once_per_entity_keeps_a_batch_killed_after_its_commit_to_one_effect(ndb_emulator):
    keys = make_items(60)
    jobs_support.DIE_AT.clear()
    jobs_support.DIE_AT.add(keys[25].id())
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(),
            jobs_support.bump_once_then_die,
            batched=True,
            shards=1,
            batch_size=10,
        )
        _run_some(queue, 1)
        [task] = queue.tasks
        gae_deferred.configure(task_deadline_seconds=1)
        with pytest.raises(jobs_support.Killed):
            queue.run(task)
        _deliver_after_the_deadline(task)
    assert set(_seen().values()) == {1}
    assert iteration.get_job(job.id).processed == 60


def test_a_chain_link_lost_after_its_commit_is_created_by_the_sweeper(ndb_emulator, monkeypatch):
    make_items(30)
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(), jobs_support.bump, shards=1, batch_size=10, time_budget=0.001
        )
        _run_some(queue, 1)
        create_task = queue.create_task

        def lose_the_second_link(parent, task):
            if task.name.endswith("-c2"):
                raise api_exceptions.ServiceUnavailable("the instance died after the commit")
            return create_task(parent, task)

        monkeypatch.setattr(queue, "create_task", lose_the_second_link)
        _run_some(queue, 1)  # one batch, then the hand-over is committed but never created
        assert queue.tasks == []
        assert iteration.job_shards(job.id)[0].chain == 2
        monkeypatch.setattr(queue, "create_task", create_task)
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=10)
        assert gae_deferred.sweep(now=later).reenqueued == 1
        queue.run_all()
    assert set(_seen().values()) == {1}
    assert iteration.get_job(job.id).state == "done"


def test_finalize_runs_once_when_the_last_shards_commit_at_the_same_time(ndb_emulator):
    make_items(80)
    shards = 8
    jobs_support.BARRIER.reset()
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(),
            jobs_support.meet_then_bump,
            batched=True,
            shards=shards,
            batch_size=50,
            finalize=jobs_support.record_totals,
        )
        _run_some(queue, 1)
        shard_tasks = queue.tasks
        assert len(shard_tasks) == shards
        queue.clear()
        outcomes = [None] * shards

        def deliver(position, task):
            info = TaskInfo(name=task.name, queue=task.queue)
            outcomes[position] = gae_deferred.execute_task(task.payload, info)

        threads = [
            threading.Thread(target=deliver, args=(position, task))
            for position, task in enumerate(shard_tasks)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert [outcome.status for outcome in outcomes] == [200] * shards
        finalizers = [task for task in queue.tasks if task.function.endswith("_run_finalize")]
        assert len(finalizers) == 1
        [finalizer] = finalizers
        with pytest.raises(gae_deferred.DeferError, match="is finalizing"):
            gae_deferred.cancel_job(job.id)
        queue.run_all()
        # A second delivery of the finalize task does nothing.
        info = TaskInfo(name=finalizer.name, queue=finalizer.queue, retry_count=1)
        assert gae_deferred.execute_task(finalizer.payload, info).status == 200
    outcome = Outcome.get_by_id(job.id)
    assert (outcome.calls, outcome.processed, outcome.shards) == (1, 80, 8)
    assert iteration.get_job(job.id).shards_done == 8


def test_cancel_stops_every_shard_and_finalize_never_runs(ndb_emulator):
    make_items(400)
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(),
            jobs_support.bump,
            shards=4,
            batch_size=5,
            time_budget=0.001,
            finalize=jobs_support.record_totals,
        )
        _run_some(queue, 9)  # the plan, and two tasks of each shard
        before = sum(_seen().values())
        assert 0 < before < 400
        gae_deferred.cancel_job(job.id)
        queue.run_all()
    assert sum(_seen().values()) == before
    record = iteration.get_job(job.id)
    assert (record.state, record.finalize_state, record.processed) == (
        "cancelled",
        "cancelled",
        before,
    )
    assert Outcome.get_by_id(job.id) is None
    with pytest.raises(gae_deferred.DeferError, match="already cancelled"):
        gae_deferred.cancel_job(job.id)


def test_a_batch_under_way_when_the_job_is_cancelled_counts_in_its_totals(ndb_emulator):
    keys = make_items(60)
    jobs_support.CANCEL_AT.clear()
    jobs_support.CANCEL_AT.add(keys[12].id())  # in the second batch of ten
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(), jobs_support.bump_then_cancel, shards=1, batch_size=10
        )
        queue.run_all()
    assert sum(_seen().values()) == 20
    record = iteration.get_job(job.id)
    assert (record.state, record.processed) == ("cancelled", 20)
    assert iteration.job_shards(job.id)[0].processed == 20


def test_pause_stops_the_shards_and_resume_goes_on_from_their_last_key(ndb_emulator):
    make_items(300)
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(),
            jobs_support.bump,
            shards=3,
            batch_size=10,
            time_budget=0.001,
            finalize=jobs_support.record_totals,
        )
        _run_some(queue, 4)
        gae_deferred.pause_job(job.id)
        queue.run_all()
        paused_at = sum(_seen().values())
        assert 0 < paused_at < 300
        assert iteration.get_job(job.id).state == "paused"
        with pytest.raises(gae_deferred.DeferError, match="only a running job"):
            gae_deferred.pause_job(job.id)
        gae_deferred.resume_job(job.id)
        queue.run_all()
    assert set(_seen().values()) == {1}
    assert Outcome.get_by_id(job.id).processed == 300


def test_a_task_of_a_chain_resumed_meanwhile_stops(ndb_emulator):
    make_items(40)
    with capture_tasks() as queue:
        job = gae_deferred.iterate(Item.query(), jobs_support.bump, shards=1, batch_size=10)
        _run_some(queue, 1)
        [stale] = queue.tasks
        gae_deferred.pause_job(job.id)
        gae_deferred.resume_job(job.id)
        fresh = [task for task in queue.tasks if task is not stale]
        assert len(fresh) == 1
        queue.run(stale)
        assert sum(_seen().values()) == 0
        queue.run_all()
    assert set(_seen().values()) == {1}


def test_an_entity_that_always_raises_is_recorded_and_skipped_after_the_retry_limit(ndb_emulator):
    keys = make_items(50, poison=frozenset({17}))
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(),
            jobs_support.bump,
            shards=2,
            batch_size=10,
            finalize=jobs_support.record_totals,
        )
        # queue.yaml's default queue: task_retry_limit 5, so six attempts, the last skips.
        assert _run_until_empty(queue, ValueError) == 5
    seen = _seen()
    assert seen[keys[17].id()] == 0
    assert {seen[key.id()] for key in keys if key != keys[17]} == {1}
    [failure] = iteration.job_failures(job.id)
    assert failure.entity == keys[17]
    assert failure.exception_type == "ValueError"
    assert f"poisoned item {keys[17].id()}" in failure.message
    assert "Traceback" in failure.traceback
    assert failure.attempts == 6
    outcome = Outcome.get_by_id(job.id)
    assert (outcome.processed, outcome.failed, outcome.calls) == (49, 1, 1)


def test_a_batch_that_keeps_failing_is_split_to_find_the_failing_entity(ndb_emulator):
    keys = make_items(30, poison=frozenset({3, 12}))
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(), jobs_support.bump_batch, batched=True, shards=1, batch_size=10
        )
        assert _run_until_empty(queue, ValueError) == 5 + 5
    failed = sorted(failure.entity.id() for failure in iteration.job_failures(job.id))
    assert failed == [keys[3].id(), keys[12].id()]
    seen = _seen()
    assert {seen[key.id()] for key in keys if key not in (keys[3], keys[12])} == {1}
    record = iteration.get_job(job.id)
    assert (record.processed, record.failed) == (28, 2)


def test_permanent_task_failure_skips_the_entity_at_once(ndb_emulator):
    keys = make_items(10)

    def refuse_third(item):
        if item.key == keys[2]:
            raise gae_deferred.PermanentTaskFailure("cannot migrate this one")
        jobs_support.bump(item)

    with capture_tasks() as queue:
        job = gae_deferred.iterate(Item.query(), refuse_third, shards=1)
        queue.run_all()
    [failure] = iteration.job_failures(job.id)
    assert (failure.entity, failure.attempts) == (keys[2], 1)
    assert iteration.get_job(job.id).processed == 9


def test_a_failing_finalize_is_retried_then_recorded(ndb_emulator):
    make_items(5)

    def broken(totals):
        raise RuntimeError(f"report for {totals.processed} failed")

    with capture_tasks() as queue:
        job = gae_deferred.iterate(Item.query(), jobs_support.bump, shards=1, finalize=broken)
        assert _run_until_empty(queue, RuntimeError) == 5
    record = iteration.get_job(job.id)
    assert (record.state, record.finalize_state) == ("done", "failed")
    assert "RuntimeError: report for 5 failed" in record.finalize_error


def test_transactional_start_joins_the_callers_transaction(ndb_emulator):
    make_items(10)
    with capture_tasks() as queue:

        def start_then_fail():
            gae_deferred.iterate(Item.query(), jobs_support.bump, _transactional=True)
            raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            ndb.transaction(start_then_fail)
        assert iteration.DeferredJob.query().fetch() == []
        assert queue.tasks == []
        job = ndb.transaction(
            lambda: gae_deferred.iterate(Item.query(), jobs_support.bump, _transactional=True)
        )
        assert job.transactional
        queue.run_all()
    assert set(_seen().values()) == {1}
    with pytest.raises(gae_deferred.DeferError, match="active ndb transaction"):
        gae_deferred.iterate(Item.query(), jobs_support.bump, _transactional=True)


def test_a_job_started_inside_a_transaction_without_transactional_does_not_depend_on_it(
    ndb_emulator,
):
    make_items(3)
    with capture_tasks() as queue:

        def start_then_fail():
            gae_deferred.iterate(Item.query(), jobs_support.bump)
            raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            ndb.transaction(start_then_fail)
        queue.run_all()
    assert set(_seen().values()) == {1}


def test_an_empty_query_finishes_and_finalizes_with_zero(ndb_emulator):
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(), jobs_support.bump, finalize=jobs_support.record_totals
        )
        queue.run_all()
    assert Outcome.get_by_id(job.id).processed == 0
    assert iteration.get_job(job.id).shards == 1


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (lambda: Item.query().order(Item.seen), "sort orders"),
        (lambda: Item.query(Item.seen > 3), "equality filters only"),
        (lambda: Item.query(ndb.OR(Item.seen == 1, Item.seen == 2)), "equality filters only"),
        (lambda: Item.query(projection=[Item.seen]), "projection"),
        (lambda: ndb.Query(), "one kind"),
    ],
)
def test_queries_that_key_ranges_cannot_shard_are_refused(ndb_emulator, query, message):
    with capture_tasks() as queue:
        with pytest.raises(ValueError, match=message):
            gae_deferred.iterate(query(), jobs_support.bump)
        assert queue.tasks == []
    assert iteration.DeferredJob.query().fetch() == []


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"shards": 0}, ValueError),
        ({"shards": 101}, ValueError),
        ({"shards": "8"}, TypeError),
        ({"batch_size": 0}, ValueError),
        ({"time_budget": 600}, ValueError),
        ({"queue": "no such/queue"}, ValueError),
        ({"finalize": 3}, TypeError),
    ],
)
def test_bad_options_are_refused(ndb_emulator, options, error):
    with capture_tasks() as queue:
        with pytest.raises(error):
            gae_deferred.iterate(Item.query(), jobs_support.bump, **options)
        assert queue.tasks == []


def test_a_fn_that_pickles_too_big_is_refused(ndb_emulator):
    table = random.Random(1).randbytes(1_000_000)  # captured by the closure; incompressible

    def look_up(item):
        return table[item.key.id() % len(table)]

    with capture_tasks() as queue:
        with pytest.raises(gae_deferred.DeferError, match="a job keeps at most 900,000"):
            gae_deferred.iterate(Item.query(), look_up)
        assert queue.tasks == []


def test_a_queue_missing_from_queue_yaml_is_refused_before_anything_is_written(ndb_emulator):
    with capture_tasks() as queue:
        with pytest.raises(gae_deferred.QueueNotFoundError, match="'nightly' is not in"):
            gae_deferred.iterate(Item.query(), jobs_support.bump, queue="nightly")
        assert queue.tasks == []
    assert iteration.DeferredJob.query().fetch() == []


def test_once_per_entity_refuses_a_batch_its_commit_could_not_hold(ndb_emulator):
    make_items(260)
    with capture_tasks() as queue:
        job = gae_deferred.iterate(
            Item.query(), jobs_support.bump_once, batched=True, shards=1, batch_size=260
        )
        with pytest.raises(gae_deferred.DeferError, match="at most 250 entities a call"):
            _run_some(queue, 2)
        queue.clear()
    assert set(_seen().values()) == {0}
    assert iteration.job_shards(job.id)[0].processed == 0


def test_once_per_entity_outside_a_job_is_an_error(ndb_emulator):
    [key] = make_items(1)
    with pytest.raises(gae_deferred.DeferError, match="inside an iterate"):
        jobs_support.bump_each_once(key.get())


def test_key_sampling_splits_the_range_evenly(ndb_emulator):
    keys = make_items(1000)
    splits, how, looked_at = iteration.plan_splits(Item.query(), 8)
    assert (how, looked_at) == ("keys", 1000)
    assert splits == [keys[125 * index] for index in range(1, 8)]
