"""Upvote (google/upvote_py2), a production App Engine app, on gae_deferred: unchanged but for
its imports (tests/ported/upstream/upvote_*.py).

change_set.py commits Bit9 rule changes one per task inside ``@ndb.transactional(xg=True)``
functions, tail-defers the next change from inside the transaction, and raises
PermanentTaskFailure from inside it for changes that can never apply. datastore/utils.py pages
through a query in a chain of tasks that carry the query, the callbacks (bound methods here)
and the last page's entities, so the payloads spill to Datastore.
"""

from __future__ import annotations

import os

import pytest
import upvote_change_set as change_set
import upvote_datastore_utils as datastore_utils
from google.cloud import ndb
from ported_fixtures import change, remaining_changes, rule
from upvote_stand_ins import (
    BIGQUERY_ROWS,
    Bit9Binary,
    FileInstance,
    FileRule,
    bit9_utils,
    constants,
)

import gae_deferred
from gae_deferred import failures
from gae_deferred.testing import TaskQueue

QUEUE = constants.TASK_QUEUE.BIT9_COMMIT_CHANGE
POLICY = constants.RULE_POLICY
BIT9 = bit9_utils.CONTEXT


@pytest.fixture(autouse=True)
def _fresh_bit9():
    BIT9.reset()
    BIGQUERY_ROWS.clear()


@pytest.fixture
def binary(deferred_tasks: TaskQueue) -> Bit9Binary:
    """A binary with a local rule (host 5678, whose fileInstance Bit9 has) and a global rule."""
    binary = Bit9Binary(id="sha256-1", file_catalog_id="1234")
    binary.put()
    FileInstance(id=9012, file_catalog_id=1234, computer_id=5678, local_state=1).put(BIT9)
    BIT9.writes.clear()
    return binary


# --- change_set.py: one transaction per task, tail defers, PermanentTaskFailure ----------------


def test_each_task_commits_one_change_and_tail_defers_the_next(deferred_tasks, binary):
    local, global_ = rule(binary, "local", host_id="5678"), rule(binary, "global")
    change(binary, "c1", [local], POLICY.WHITELIST)
    change(binary, "c2", [global_], POLICY.WHITELIST)
    change(binary, "c3", [global_], POLICY.REMOVE)

    change_set.DeferCommitBlockableChangeSet(binary.key)

    [first] = deferred_tasks.tasks_in(QUEUE)
    assert first.function == "upvote_change_set._CommitBlockableChangeSet"
    deferred_tasks.run(first)
    [second] = deferred_tasks.tasks_in(QUEUE)  # deferred from inside the transaction
    assert "tail_defer_count=1" in second.args
    assert remaining_changes(binary) == ["c2", "c3"]

    assert deferred_tasks.run_all(queue=QUEUE) == 2
    assert remaining_changes(binary) == []
    assert local.key.get().is_committed and local.key.get().is_fulfilled
    assert global_.key.get().is_committed
    assert [write[0] for write in BIT9.writes] == ["FileInstance", "FileRule", "FileRule"]
    assert [write[1]["file_state"] for write in BIT9.writes[1:]] == [2, 1]  # approved, then not
    assert BIGQUERY_ROWS == [("local", "Fulfilled in Bit9")]


def test_permanent_failure_inside_the_transaction_rolls_back_and_ends_the_chain(
    deferred_tasks, binary
):
    local, global_ = rule(binary, "local", host_id="5678"), rule(binary, "global")
    change(binary, "c1", [local], POLICY.WHITELIST)
    change(binary, "c2", [local, global_], POLICY.BLACKLIST)  # mixed: can never apply
    change(binary, "c3", [global_], POLICY.WHITELIST)

    change_set.DeferCommitBlockableChangeSet(binary.key)
    assert deferred_tasks.run_all() == 2

    [failure] = deferred_tasks.take_failures()
    assert failure.state == "permanent"
    assert isinstance(failure.exception, gae_deferred.PermanentTaskFailure)
    assert failure.task.function == "upvote_change_set._CommitBlockableChangeSet"
    # Rolled back: c2 and everything after it are still there, nothing was retried.
    assert remaining_changes(binary) == ["c2", "c3"]
    assert local.key.get().is_committed and not global_.key.get().is_committed
    assert deferred_tasks.tasks == []
    record = failures.get(failures.failure_id(QUEUE, failure.task.name))
    assert record.state == "permanent"
    assert record.exception_type == "gae_deferred.errors.PermanentTaskFailure"


def test_bit9_outage_rolls_back_and_the_retry_commits(deferred_tasks, binary):
    global_ = rule(binary, "global")
    change(binary, "c1", [global_], POLICY.WHITELIST)
    change_set.DeferCommitBlockableChangeSet(binary.key)

    BIT9.fail_next = ConnectionError("Bit9 is down")
    with pytest.raises(ConnectionError, match="Bit9 is down"):
        deferred_tasks.run_all()
    assert remaining_changes(binary) == ["c1"] and not global_.key.get().is_committed
    [retry] = deferred_tasks.tasks
    assert retry.retry_count == 1

    deferred_tasks.run_all()
    assert remaining_changes(binary) == [] and global_.key.get().is_committed
    assert FileRule.query().execute(BIT9)[0].file_state == 2


# --- datastore/utils.py: a query paged through a chain of tasks ------------------------------


class Document(ndb.Model):
    body = ndb.BlobProperty()


class Tally:
    """The callbacks the chain carries: bound methods of an object pickled with the task."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.pages: list[int] = []

    def Keep(self, document: Document) -> Document:
        return document

    def Record(self, documents: list[Document], *extra: bytes) -> None:
        # The tally itself is a copy in each task: what it saw goes to Datastore.
        TallyPage(label=self.label, size=len(documents), extra=sum(len(e) for e in extra)).put()


class TallyPage(ndb.Model):
    label = ndb.StringProperty()
    size = ndb.IntegerProperty()
    extra = ndb.IntegerProperty()


def documents(count: int) -> None:
    # Random bodies: a page of 100 is ~200 KB that does not compress, so every page spills.
    ndb.put_multi([Document(body=os.urandom(2000)) for _ in range(count)])


@ndb.transactional()
def start_tally(label: str, extra: bytes = b"", fail: bool = False) -> None:
    TallyPage(id=f"started-{label}", label="marker").put()
    datastore_utils.QueuedPaginatedBatchApply(
        Document.query(),
        Tally(label).Record,
        extra_args=[extra] if extra else None,
        pre_queue_callback=Tally(label).Keep,
        page_size=100,
    )
    if fail:
        raise RuntimeError("rolled back after deferring")


def pages(label: str) -> list[int]:
    return sorted(page.size for page in TallyPage.query().fetch() if page.label == label)


def test_paged_chain_carries_entities_and_bound_methods(deferred_tasks):
    documents(250)
    start_tally("all")
    [first] = deferred_tasks.tasks
    assert first.function == "upvote_datastore_utils._QueuedPaginatedBatchApply"
    assert not first.spilled

    deferred_tasks.run(first)
    [second] = deferred_tasks.tasks
    assert second.spilled  # it carries the first page: 100 entities
    deferred_tasks.run_all()
    assert pages("all") == [50, 100, 100]


def test_big_non_transactional_defer_inside_a_transaction_that_commits(deferred_tasks):
    documents(30)
    start_tally("big", extra=os.urandom(200_000))
    [first] = deferred_tasks.tasks
    assert first.spilled
    deferred_tasks.run_all()
    assert pages("big") == [30]


def test_big_non_transactional_defer_survives_its_transaction_rolling_back(deferred_tasks):
    # Not transactional: legacy enqueued the task whatever the transaction did, and the
    # task must find its spilled payload even though the transaction never committed.
    documents(30)
    with pytest.raises(RuntimeError, match="rolled back"):
        start_tally("rolled back", extra=os.urandom(200_000), fail=True)
    assert TallyPage.get_by_id("started-rolled back") is None
    assert deferred_tasks.run_all() == 2
    assert pages("rolled back") == [30]
