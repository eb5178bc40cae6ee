"""gae_deferred.batch() against the Cloud Tasks emulator (real gRPC) and the in-memory Datastore.

The emulator's CreateTask and BatchCreateTasks are wrapped to take 40 ms and count how many run
at once, so the concurrency bound is observed where it matters: at the service.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from google.cloud import ndb, tasks_v2

import gae_deferred
from gae_deferred import (
    BatchDeferError,
    DeferError,
    QueueNotFoundError,
    TaskAlreadyExistsError,
    batch,
    defer,
    envelope,
    spillover,
)
from gae_deferred.cloud_tasks import client as tasks_client, queue_path
from tests.callables import add
from tests.stack_support import ROOT

CREATE_TASK_SECONDS = 0.04


class InFlight:
    """Counts CreateTask and BatchCreateTasks requests being served at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def reset(self) -> None:
        with self.lock:
            self.now = self.peak = 0

    def wrap(self, create_task):
        def counted(request):
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                time.sleep(CREATE_TASK_SECONDS)
                return create_task(request)
            finally:
                with self.lock:
                    self.now -= 1

        return counted


@pytest.fixture(scope="module")
def emulator():
    from gae_deferred.local.cloudtasks import CloudTasksEmulator

    server = CloudTasksEmulator(
        port=0,
        queue_yaml=str(ROOT / "queue.yaml"),
        project="test-project",
        location="us-central1",
        app_url="http://127.0.0.1:9",
    )
    server.in_flight = InFlight()
    # The handler table is built from this attribute when the server starts.
    server._create_task = server.in_flight.wrap(server._create_task)
    server._batch_create_tasks = server.in_flight.wrap(server._batch_create_tasks)
    server.start()
    previous = os.environ.get("CLOUD_TASKS_EMULATOR_HOST")
    os.environ["CLOUD_TASKS_EMULATOR_HOST"] = f"127.0.0.1:{server.port}"
    gae_deferred.cloud_tasks.reset_client()
    try:
        yield server
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("CLOUD_TASKS_EMULATOR_HOST", None)
        else:
            os.environ["CLOUD_TASKS_EMULATOR_HOST"] = previous
        gae_deferred.cloud_tasks.reset_client()


@pytest.fixture
def queued(emulator, ndb_stub):
    """The default queue paused and empty; returns a function listing its tasks (full view)."""
    client = tasks_client()
    path = queue_path("default")
    client.pause_queue(name=path)
    client.purge_queue(name=path)
    emulator.in_flight.reset()
    emulator.reset_counts()

    def tasks() -> list[tasks_v2.Task]:
        request = {"parent": path, "response_view": tasks_v2.Task.View.FULL}
        return list(client.list_tasks(request=request))

    return tasks


def _args_of(task: gae_deferred.DeferredTask) -> str:
    return envelope.read_header(task.payload)["args"]


def test_tasks_are_in_call_order_and_all_enqueued(queued):
    with batch(concurrency=8) as b:
        indexes = [b.defer(add, number, 1) for number in range(20)]
    assert indexes == list(range(20))
    assert [_args_of(task) for task in b.tasks] == [f"{n}, 1" for n in range(20)]
    names = {task.name.rsplit("/", 1)[-1] for task in queued()}
    assert names == {task.name for task in b.tasks}


@pytest.mark.parametrize("concurrency", [1, 4])
def test_concurrency_bound_is_respected_at_the_service(queued, emulator, concurrency):
    with batch(concurrency=concurrency) as b:
        for number in range(400):
            b.defer(add, number, 2)
    assert len(queued()) == 400
    assert (emulator.rpc_counts["BatchCreateTasks"], emulator.rpc_counts["CreateTask"]) == (4, 0)
    # 4 calls of 100 tasks, 40 ms each, `concurrency` at a time: the bound is reached, never
    # passed.
    assert emulator.in_flight.peak == concurrency


def test_spilled_payloads_share_commits(queued, datastore_commits):
    gae_deferred.configure(compression_level=0)
    with batch() as b:
        for _ in range(5):
            b.defer(add, os.urandom(300_000), 0)
        b.defer(add, 1, 2)
    assert [task.spilled for task in b.tasks] == [True] * 5 + [False]
    assert len(datastore_commits.kinds()) == 1
    assert datastore_commits.kinds()[0].count("_DeferredPayload") == 5
    assert len(queued()) == 6


def test_spilled_commits_stay_under_the_datastore_limits(queued, datastore_commits):
    gae_deferred.configure(compression_level=0)
    with batch() as b:
        for _ in range(3):
            b.defer(add, b"\7" * 4_000_000, 0)
    # 12 MB of chunks: four commits of at most commit_bytes (3 MiB: three 1 MB chunks) each,
    # shared by the payloads, each record in the commit of its last chunk.
    assert gae_deferred.settings().commit_bytes == 3 * 1024 * 1024
    assert max(datastore_commits.request_bytes()) <= 3 * 1024 * 1024
    assert sum(datastore_commits.chunk_bytes()) > 12_000_000
    kinds = datastore_commits.kinds()
    assert len(kinds) == 4
    assert [commit.count("_DeferredPayload") for commit in kinds] == [0, 1, 1, 1]
    assert len(queued()) == 3


def test_partial_failure_reports_each_failed_call_and_keeps_the_rest(queued):
    defer(add, 0, 0, _name="taken")
    with pytest.raises(BatchDeferError) as raised, batch() as b:
        b.defer(add, 1, 1)
        b.defer(add, 2, 2, _queue="no-such-queue")
        b.defer(add, 3, 3, _name="taken")
        b.defer(add, os.urandom(300_000), 4)
        b.defer(add, os.urandom(300_000), 5, _queue="no-such-queue")
    failures = raised.value.failures
    assert [index for index, _ in failures] == [1, 2, 4]
    assert isinstance(failures[0][1], QueueNotFoundError)
    assert isinstance(failures[1][1], TaskAlreadyExistsError)
    assert isinstance(failures[2][1], QueueNotFoundError)
    assert b.tasks is raised.value.tasks
    assert [task is None for task in b.tasks] == [False, True, True, False, True]
    names = {task.name.rsplit("/", 1)[-1] for task in queued()}
    assert names == {"taken", b.tasks[0].name, b.tasks[3].name}
    # The spilled call whose task was not created left no payload behind.
    (record,) = spillover.DeferredPayload.query().fetch()
    assert record.key.id() == b.tasks[3].payload_id


def test_spill_kept_when_its_delete_fails_is_outcome_unknown(queued, datastore_commits):
    from google.api_core import exceptions as api_exceptions

    datastore_commits.fail_when = lambda request: (
        api_exceptions.ServiceUnavailable("datastore went away")
        if datastore_commits.deletes(request)
        else None
    )
    try:
        with pytest.raises(BatchDeferError) as raised, batch() as b:
            b.defer(add, os.urandom(300_000), 1, _queue="no-such-queue")
    finally:
        datastore_commits.fail_when = None
    ((index, error),) = raised.value.failures
    assert index == 0 and isinstance(error, gae_deferred.EnqueueOutcomeUnknown)
    assert len(spillover.DeferredPayload.query().fetch()) == 1


def test_an_exception_inside_the_block_enqueues_nothing(queued):
    with pytest.raises(RuntimeError, match="changed my mind"), batch() as b:
        b.defer(add, 1, 1)
        b.defer(add, os.urandom(300_000), 1)
        raise RuntimeError("changed my mind")
    assert queued() == []
    assert spillover.DeferredPayload.query().fetch() == []
    assert b.tasks == []


def test_invalid_options_raise_at_batch_defer(queued):
    with batch() as b:
        with pytest.raises(DeferError, match="_countdown"):
            b.defer(add, 1, 1, _countdown=-1)
        with pytest.raises(DeferError, match="_queue"):
            b.defer(add, 1, 1, _queue="bad queue!")
        b.defer(add, 1, 1)
    assert len(b.tasks) == 1 and len(queued()) == 1
    with pytest.raises(DeferError, match="inside its `with batch"):
        b.defer(add, 1, 1)
    with pytest.raises(DeferError, match="concurrency"):
        batch(concurrency=0)


def test_transactional_outside_a_transaction_raises_at_batch_defer(queued):
    with batch() as b, pytest.raises(DeferError, match="active ndb transaction"):
        b.defer(add, 1, 1, _transactional=True)


class Order(ndb.Model):
    total = ndb.IntegerProperty()


def test_transactional_batch_is_one_write_set_in_the_callers_commit(queued, datastore_commits):
    @ndb.transactional()
    def place():
        Order(id="b1", total=3).put()
        with batch() as b:
            for number in range(3):
                b.defer(add, number, 0, _transactional=True)
        assert queued() == []
        return b.tasks

    tasks = place()
    # One Commit: the caller's order and the three payloads.
    assert len(datastore_commits.kinds()) == 1
    assert sorted(datastore_commits.kinds()[0]) == sorted(
        ["Order"] + ["_DeferredPayload", "_DeferredPayloadChunk"] * 3
    )
    assert not any(task.was_enqueued for task in tasks)
    names = {task.name.rsplit("/", 1)[-1] for task in queued()}
    assert names == {task.name for task in tasks}


def test_transactional_batch_rolled_back_enqueues_nothing(queued):
    @ndb.transactional()
    def place():
        Order(id="b2", total=3).put()
        with batch() as b:
            b.defer(add, 1, 0, _transactional=True)
            b.defer(add, 2, 0)  # not transactional: enqueued whatever happens
        raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        place()
    (task,) = queued()
    assert envelope.read_header(task.app_engine_http_request.body)["args"] == "2, 0"
    assert spillover.DeferredPayload.query().fetch() == []
    assert Order.get_by_id("b2") is None
