"""Entities and functions the iterate() tests run (importable by name, as tasks need)."""

from __future__ import annotations

import collections
import threading

from google.cloud import ndb
from google.cloud.datastore_v1.types import datastore as datastore_pb2

import gae_deferred


class Item(ndb.Model):
    """An entity a job walks: ``seen`` counts the times fn changed it."""

    group = ndb.StringProperty()
    seen = ndb.IntegerProperty(default=0)
    poison = ndb.BooleanProperty(default=False)


class Outcome(ndb.Model):
    """What a finalize wrote: one per job (id: the job id)."""

    processed = ndb.IntegerProperty()
    failed = ndb.IntegerProperty()
    shards = ndb.IntegerProperty()
    calls = ndb.IntegerProperty(default=0)


def make_items(count: int, *, group: str = "a", poison: frozenset[int] = frozenset()) -> list:
    """``count`` new Items; their keys in key order (the order a job walks them: Google's
    emulators scatter ids), the ones at the ``poison`` positions of that order poisoned."""
    keys = []
    for start in range(0, count, 500):
        keys += ndb.put_multi([Item(group=group) for _ in range(start, min(count, start + 500))])
    keys.sort()
    if poison:
        poisoned = ndb.get_multi([keys[index] for index in sorted(poison)])
        for item in poisoned:
            item.poison = True
        ndb.put_multi(poisoned)
    return keys


def seed_items(count: int) -> list[ndb.Key]:
    """``count`` fresh Items with ids 1..count, written by raw Commits of 500 (no ndb model
    conversion: ten times faster than put_multi for the 10,000-entity test)."""
    client = ndb.get_context().client
    for start in range(0, count, 500):
        request = datastore_pb2.CommitRequest()._pb
        request.project_id = client.project
        request.mode = datastore_pb2.CommitRequest.Mode.NON_TRANSACTIONAL
        for number in range(start + 1, min(count, start + 500) + 1):
            entity = request.mutations.add().upsert
            entity.key.partition_id.project_id = client.project
            element = entity.key.path.add()
            element.kind, element.id = "Item", number
            entity.properties["group"].string_value = "a"
            entity.properties["seen"].integer_value = 0
            entity.properties["poison"].boolean_value = False
        client.stub.commit(datastore_pb2.CommitRequest.wrap(request))
    return [ndb.Key(Item, number) for number in range(1, count + 1)]


def bump(item: Item) -> None:
    """fn(entity): count the visit on the entity."""
    if item.poison:
        raise ValueError(f"poisoned item {item.key.id()}")
    item.seen += 1
    item.put()


def bump_batch(items: list[Item]) -> None:
    """fn(batch)."""
    for item in items:
        if item.poison:
            raise ValueError(f"poisoned item {item.key.id()}")
        item.seen += 1
    ndb.put_multi(items)


#: The keys visit_batch saw, and how often: the test resets it.
VISITS: collections.Counter = collections.Counter()


def visit_batch(items: list[Item]) -> None:
    """fn(batch) that writes nothing: its effect (the set of keys seen) is idempotent, and it
    counts each call per key, so a test sees any repeat."""
    VISITS.update(item.key.id() for item in items)


class Killed(BaseException):
    """The instance dies: nothing after this runs, nothing is committed (not an Exception, so
    the task handler does not record it either)."""


#: Ids of the entities at which the next call of a *_or_die function dies (once each).
DIE_AT: set[int] = set()


def bump_or_die(item: Item) -> None:
    """fn(entity) that dies at an entity of DIE_AT, once."""
    if item.key.id() in DIE_AT:
        DIE_AT.discard(item.key.id())
        raise Killed
    bump(item)


def bump_once_then_die(items: list[Item]) -> None:
    """fn(batch): bump_once (its transaction commits), then die if the batch holds an entity
    of DIE_AT, once: the instance is lost between fn's commit and the shard's."""
    bump_once(items)
    for item in items:
        if item.key.id() in DIE_AT:
            DIE_AT.discard(item.key.id())
            raise Killed


#: Ids of the entities at which bump_then_cancel cancels the job it runs in.
CANCEL_AT: set[int] = set()


def bump_then_cancel(item: Item) -> None:
    """fn(entity) that cancels its own job at an entity of CANCEL_AT: the rest of its batch
    still runs (a cancel takes effect at the next batch boundary)."""
    if item.key.id() in CANCEL_AT:
        gae_deferred.cancel_job(gae_deferred.current_job())
    bump(item)


#: The shards of the concurrency test meet here before their last commit.
BARRIER = threading.Barrier(8, timeout=60)


def meet_then_bump(items: list[Item]) -> None:
    """fn(batch) that waits for the other shards' tasks first."""
    BARRIER.wait()
    bump_batch(items)


bump_once = gae_deferred.once_per_entity(bump_batch)
bump_each_once = gae_deferred.once_per_entity(bump)


def record_totals(totals: gae_deferred.JobTotals) -> None:
    """finalize: write the totals, counting the calls."""

    def write() -> None:
        key = ndb.Key(Outcome, totals.job_id)
        outcome = key.get() or Outcome(key=key)
        outcome.processed = totals.processed
        outcome.failed = totals.failed
        outcome.shards = totals.shards
        outcome.calls += 1
        outcome.put()

    ndb.transaction(write)
