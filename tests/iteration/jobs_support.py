"""Entities and functions the iterate() tests run (importable by name, as tasks need)."""

from __future__ import annotations

from google.cloud import ndb

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
    keys = []
    for start in range(0, count, 500):
        keys += ndb.put_multi(
            [
                Item(group=group, poison=index in poison)
                for index in range(start, min(count, start + 500))
            ]
        )
    return keys


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
