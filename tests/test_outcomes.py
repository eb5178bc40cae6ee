"""What defer() says when a reply is lost: never "not stored" for a write that landed.

Datastore is the local emulator and Cloud Tasks the in-process emulator, each behind a
tests/fault_proxy.py proxy that loses replies after the server acted on the request (the
fault that makes an outcome unknown), so the real ndb and Cloud Tasks clients see what they
would see in production: UNAVAILABLE on a reset connection.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Iterator

import pytest
from google.cloud import ndb

import gae_deferred
from gae_deferred import EnqueueOutcomeUnknown, defer, spillover
from gae_deferred.spillover import PayloadState
from tests.callables import add
from tests.fault_proxy import FaultProxy
from tests.fixtures import ROOT
from tests.stack_support import cloud_tasks_emulator


class Order(ndb.Model):
    total = ndb.IntegerProperty()


@pytest.fixture
def datastore_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The Datastore emulator behind a fault proxy; gae_deferred and a context use it."""
    from gae_deferred.local.datastore import DatastoreEmulator

    with (
        DatastoreEmulator(port=0, index_yaml=ROOT / "index.yaml") as emulator,
        FaultProxy(("127.0.0.1", emulator.port)) as proxy,
    ):
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", proxy.address)
        client = ndb.Client(project="test-project")
        gae_deferred.configure(
            ndb_client=client,
            queue_yaml=str(ROOT / "queue.yaml"),
            datastore_timeout_seconds=2,
        )
        with client.context(cache_policy=False, global_cache_policy=False):
            yield proxy


@dataclasses.dataclass
class Proxies:
    datastore: FaultProxy
    tasks: FaultProxy


@pytest.fixture
def proxies(datastore_proxy: FaultProxy) -> Iterator[Proxies]:
    """Also a Cloud Tasks emulator of this test's own (paused queues) behind a fault proxy."""
    from gae_deferred import cloud_tasks

    with cloud_tasks_emulator() as emulator:
        for queue in ("default", "reports"):
            cloud_tasks.pause_queue(queue)
        with FaultProxy(("127.0.0.1", emulator.port)) as proxy:
            os.environ["CLOUD_TASKS_EMULATOR_HOST"] = proxy.address
            cloud_tasks.reset_client()
            yield Proxies(datastore_proxy, proxy)


def queued(queue: str = "default") -> list:
    from gae_deferred import cloud_tasks

    tasks, _ = cloud_tasks.list_tasks_page(queue, page_size=1000, full=True)
    return tasks


def test_spill_whose_commit_replies_are_lost_is_stored_not_could_not_store(proxies):
    """Every attempt of the spill's commit lands and loses its reply: the record is read back,
    so defer() succeeds with one task (it said "could not store" before, and the sweeper ran
    the task anyway). Within the deadline, too: two attempts, not four."""
    store = proxies.datastore
    # The commit and its one retry within datastore_timeout_seconds, then the read-back's
    # first attempt (it is retried once).
    store.lose_next_reply(3)
    task = defer(add, os.urandom(300_000))
    assert task.spilled
    assert store.counts["lost_replies"] == 3
    (record,) = spillover.DeferredPayload.query().fetch()
    assert record.task_name == task.name
    assert [t.name.rsplit("/", 1)[-1] for t in queued()] == [task.name]


def test_spill_whose_outcome_cannot_be_read_is_outcome_unknown_and_runs_once(proxies):
    """The commits land, and every reply, the read-back's too, is lost: EnqueueOutcomeUnknown
    naming the task and payload; the sweeper then creates that task once."""
    store = proxies.datastore
    store.lose_next_reply(4)  # the commit's two attempts, the read-back's two
    with pytest.raises(EnqueueOutcomeUnknown) as raised:
        defer(add, os.urandom(300_000))
    store.disarm()  # disarm what is left
    error = raised.value
    assert error.task_name and error.payload_id and error.queue == "default"
    assert "could not store" not in str(error)
    assert queued() == []
    record = spillover.get(error.payload_id)
    assert record is not None and record.task_name == error.task_name
    later = spillover.now() + datetime.timedelta(days=1)
    assert gae_deferred.sweep(now=later).reenqueued == 1
    assert gae_deferred.sweep(now=later).reenqueued == 0
    assert [t.name.rsplit("/", 1)[-1] for t in queued()] == [error.task_name]


def test_transactional_defer_whose_commit_reply_is_lost_commits_once(proxies):
    """ndb reran a transaction whose commit landed but lost its reply: the caller's writes and
    the transactional task happened twice. The commit is now settled by reading the payload:
    one run of the transaction, one record, one task."""
    store = proxies.datastore
    runs = []

    def pay() -> None:
        runs.append(1)
        Order(id=f"o-{len(runs)}", total=5).put()
        defer(add, 1, 2, _transactional=True)
        store.lose_next_reply()  # what is sent next is the Commit

    ndb.transaction(pay)
    assert len(runs) == 1
    assert store.counts["lost_replies"] == 1
    assert len(Order.query().fetch()) == 1
    assert len(spillover.DeferredPayload.query().fetch()) == 1
    assert len(queued()) == 1


def test_transactional_commit_that_cannot_be_settled_is_outcome_unknown(proxies):
    """Commit reply lost and the read-back fails too: EnqueueOutcomeUnknown from the
    transaction (not ndb's RetryError after rerunning it), and what committed runs once."""
    store = proxies.datastore
    runs = []

    def pay() -> None:
        runs.append(1)
        defer(add, 1, 2, _transactional=True)
        store.lose_next_reply(3)  # the commit's, the read-back's two attempts

    with pytest.raises(EnqueueOutcomeUnknown) as raised:
        ndb.transaction(pay)
    store.disarm()
    assert len(runs) == 1
    error = raised.value
    assert error.task_name and error.payload_id
    (record,) = spillover.DeferredPayload.query().fetch()
    assert record.state == PayloadState.PENDING and record.task_name == error.task_name
    later = spillover.now() + datetime.timedelta(days=1)
    assert gae_deferred.sweep(now=later).reenqueued == 1
    assert [t.name.rsplit("/", 1)[-1] for t in queued()] == [error.task_name]


def test_idempotent_transaction_with_a_lost_commit_reply_is_exactly_once(proxies):
    """The documented exactly-once pair: @idempotent(key=..., transactional=True) around the
    caller's writes and a transactional defer. Its commit reply lost and read back: one order,
    one task; called again with the same key (as after an error): nothing more."""
    store = proxies.datastore

    @gae_deferred.idempotent(key=lambda order_id: f"pay:{order_id}", transactional=True)
    def pay(order_id: str) -> None:
        Order(id=order_id, total=5).put()
        defer(add, 1, 2, _transactional=True)
        store.lose_next_reply()

    pay("o-1")
    store.disarm()
    pay("o-1")
    assert len(Order.query().fetch()) == 1
    assert len(queued()) == 1


def test_create_task_whose_reply_is_lost_creates_one_task(proxies):
    """CreateTask landed and its reply was lost: asked again under the same name, Cloud Tasks
    says ALREADY_EXISTS, which settles it: one task, no error (EnqueueError before)."""
    tasks = proxies.tasks
    tasks.lose_next_reply()
    task = defer(add, 1, 2)
    assert tasks.counts["lost_replies"] == 1
    assert [t.name.rsplit("/", 1)[-1] for t in queued()] == [task.name]


def test_create_task_never_answered_is_outcome_unknown_with_the_task_name(proxies):
    """Every attempt (the first and three more under the same name) lands and loses its
    answer: EnqueueOutcomeUnknown naming the task, which exists, once."""
    tasks = proxies.tasks
    tasks.lose_next_reply(4)
    with pytest.raises(EnqueueOutcomeUnknown) as raised:
        defer(add, 1, 2)
    tasks.disarm()
    names = [t.name.rsplit("/", 1)[-1] for t in queued()]
    assert names == [raised.value.task_name]
