"""gae_deferred's own transactions under pessimistic locking (Firestore in Datastore mode's
default, and our emulator's): a transaction's reads are locks, a write to what another open
transaction read waits for it, and of two that deadlock one is ABORTED after a lock timeout.

On ``ndb_emulator`` (ours, in process) and, in ``make test``'s Google legs, on Google's
Firestore emulator (the fixture follows ``pytest --datastore``).
"""

from __future__ import annotations

import threading
import time

from google.cloud import ndb

from gae_deferred import defer, metrics
from tests.stack_support import wait_for


class LockedOrder(ndb.Model):
    total = ndb.IntegerProperty()


RUNS: list[int] = []


def note(n: int) -> None:
    RUNS.append(n)


def test_two_processes_flushing_one_series_at_once_both_count(ndb_emulator):
    """Two processes' flushes read the same series, then both commit: the locks deadlock, one
    commit times out (ABORTED), ndb retries it, and every run is counted once."""
    for _ in range(5):
        metrics.observe("locked.flush", "default", 0.01, ok=True, retried=False)
    grouped = list(metrics._by_series(metrics._recorder.take()).items())
    now = time.time()
    both_read = threading.Barrier(2)
    attempts: list[str] = []
    errors: list[BaseException] = []

    def flush_as(process: str) -> None:
        def fold() -> None:
            metrics._fold(grouped, now, "v1")
            attempts.append(process)
            if len(attempts) <= 2:
                both_read.wait(10)  # both hold their read locks before either commits

        try:
            with ndb_emulator.context(cache_policy=False, global_cache_policy=False):
                ndb.transaction(fold, retries=3)
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=flush_as, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    # At least one retried after its lock timeout (on Google's emulator the retry's new read
    # lock can time the other one out in turn).
    assert len(attempts) >= 3
    assert time.monotonic() - started > 1.5
    series = metrics.get_series("function", "locked.flush")
    assert series.window("1h").runs == 10


def test_a_write_to_what_a_transactional_defer_read_waits_for_its_commit(
    paused_on_emulator, ndb_emulator
):
    """The outbox: a transaction reads an order, defers with _transactional=True and commits;
    a non-transactional write of that order meanwhile waits for the commit (it is not lost
    and does not abort it), and the task is enqueued once."""
    key = LockedOrder(id="o1", total=1).put()
    in_transaction = threading.Event()
    release = threading.Event()
    written: dict[str, float] = {}

    @ndb.transactional(retries=0)
    def place() -> None:
        order = key.get(use_cache=False)
        order.total += 10
        order.put()
        defer(note, order.total, _transactional=True)
        in_transaction.set()
        release.wait(10)

    def write_meanwhile() -> None:
        in_transaction.wait(10)
        written["from"] = time.monotonic()
        with ndb_emulator.context(cache_policy=False, global_cache_policy=False):
            LockedOrder(key=key, total=100).put()
        written["to"] = time.monotonic()

    writer = threading.Thread(target=write_meanwhile)
    writer.start()
    timer = threading.Timer(1.0, release.set)
    timer.start()
    place()
    writer.join(30)
    assert written["to"] - written["from"] > 0.5, "the write did not wait for the transaction"
    assert key.get(use_cache=False).total == 100
    tasks = wait_for(paused_on_emulator, "the transactional defer's task")
    assert len(tasks) == 1
