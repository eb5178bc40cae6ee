"""Faults injected on the wire: a TCP proxy (tests/fault_proxy.py) between this process and
the stack's Datastore and Cloud Tasks emulators, while it defers bursts of inline, spilled,
transactional and @idempotent tasks that the stack's app runs.

Every defer's outcome is classified by what it raised, and the runs are counted per task
token (rel_tasks' log) once the faults are off and the sweeper has run. The promises checked
are docs/reliability.md's, "What each answer of defer() means":

- returned: the task runs (once for spilled, transactional and @idempotent tasks, as no run
  dies here; at least once for inline ones);
- EnqueueOutcomeUnknown: at most once, never twice (the sweeper finishes what was stored);
- any other DeferError (DatastoreUnavailableError, EnqueueError), or an error out of the
  transaction other than EnqueueOutcomeUnknown: never runs, and a transaction's own writes
  are not there either;
- a transaction holding a transactional defer commits its writes and its task together:
  as many orders as runs, never two of either.

Concurrent duplicate deliveries through gunicorn and the sweeper racing a task that runs
under it are here too.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import os
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from google.api_core import exceptions as api_exceptions
from google.cloud import ndb

import gae_deferred
from gae_deferred import (
    DeferError,
    EnqueueOutcomeUnknown,
    cloud_tasks,
    defer,
    spillover,
)
from gae_deferred.local.stack import LocalStack
from tests.fault_proxy import FaultProxy
from tests.reliability import rel_tasks
from tests.reliability.rel_helpers import wait_for, wait_for_ids, wait_until_tasks_answer
from tests.stack_support import datastore

QUEUE = "fault"
KINDS = ("inline", "spilled", "transactional", "idempotent")


class RelOrder(ndb.Model):
    """The caller's own write in a transaction that also defers: counted, never repeated."""

    count = ndb.IntegerProperty(default=0)


@dataclasses.dataclass
class Proxies:
    datastore: FaultProxy
    tasks: FaultProxy

    def calm(self) -> None:
        for proxy in (self.datastore, self.tasks):
            proxy.latency = proxy.reset_rate = proxy.lost_reply_rate = 0.0
            proxy.blackhole = False
            proxy.disarm()


@pytest.fixture
def faulty(rel: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxies]:
    """This process reaches the stack's emulators through fault proxies; the app does not."""
    with (
        FaultProxy(("127.0.0.1", rel.datastore_port), seed=25) as store,
        FaultProxy(("127.0.0.1", rel.tasks_port), seed=26) as tasks,
    ):
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", store.address)
        monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", tasks.address)
        gae_deferred.reset_clients()
        gae_deferred.configure(datastore_timeout_seconds=2, cloud_tasks_timeout_seconds=2)
        proxies = Proxies(store, tasks)
        try:
            yield proxies
        finally:
            proxies.calm()
            gae_deferred.reset_clients()


def _defer_one(kind: str, log: str, token: str) -> None:
    if kind == "inline":
        defer(rel_tasks.mark, log, token, _queue=QUEUE)
    elif kind == "spilled":
        defer(rel_tasks.mark, log, token, os.urandom(150_000), _queue=QUEUE)
    elif kind == "idempotent":
        defer(rel_tasks.mark_once, log, token, _queue=QUEUE)
    else:

        def pay() -> None:
            order = RelOrder.get_by_id(token) or RelOrder(id=token)
            order.count += 1
            order.put()
            defer(rel_tasks.mark, log, token, _queue=QUEUE, _transactional=True)

        with datastore():
            ndb.transaction(pay)


def _outcome(call: Callable[[], None]) -> str:
    """``ok``, ``unknown`` (EnqueueOutcomeUnknown) or ``refused`` (any other error: the
    promise is that nothing was enqueued)."""
    try:
        call()
    except EnqueueOutcomeUnknown:
        return "unknown"
    except (DeferError, api_exceptions.GoogleAPIError):
        return "refused"
    return "ok"


@dataclasses.dataclass
class Burst:
    log: str
    outcomes: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)

    def run(self, kinds: tuple[str, ...], per_kind: int, prefix: str) -> None:
        for number in range(per_kind):
            for kind in kinds:
                token = f"{prefix}-{kind}-{number}"
                if kind == "idempotent":
                    self.outcomes[token] = (kind, self._until_enqueued(token))
                else:
                    outcome = _outcome(lambda k=kind, t=token: _defer_one(k, self.log, t))
                    self.outcomes[token] = (kind, outcome)

    def _until_enqueued(self, token: str) -> str:
        """What docs/reliability.md tells a caller with an idempotency key: after any error,
        defer again. Returns the first attempt's outcome."""
        first = None
        for _ in range(20):
            outcome = _outcome(lambda: _defer_one("idempotent", self.log, token))
            first = first or outcome
            if outcome == "ok":
                break
            time.sleep(0.5)  # a channel that saw resets waits a moment before it reconnects
        return first or "refused"

    def tokens(self, *outcomes: str) -> set[str]:
        return {t for t, (kind, outcome) in self.outcomes.items() if outcome in outcomes}


def _recover_and_count(burst: Burst, proxies: Proxies) -> dict[str, int]:
    """Faults off; the sweeper finishes what was stored; wait for every task that must run,
    then a little for any that may; the runs per token."""
    proxies.calm()
    later = spillover.now() + datetime.timedelta(days=1)
    # As cron does: sweep until a sweep goes through (a channel that saw resets backs off
    # before it reconnects).
    wait_for(lambda: not gae_deferred.sweep(now=later).errors, "a sweep without errors")
    must_run = burst.tokens("ok") | {
        t for t, (kind, _) in burst.outcomes.items() if kind == "idempotent"
    }
    wait_for_ids(burst.log, must_run, timeout=60)
    time.sleep(2.0)
    return dict(rel_tasks.read_log(burst.log))


def _orders(tokens: set[str]) -> dict[str, int]:
    with datastore():
        found = ndb.get_multi([ndb.Key(RelOrder, token) for token in sorted(tokens)])
    return {order.key.id(): order.count for order in found if order is not None}


def _check_promises(burst: Burst, runs: dict[str, int]) -> None:
    unexpected = set(runs) - set(burst.outcomes)
    assert unexpected == set(), f"ran without being deferred: {sorted(unexpected)[:5]}"
    transactional = {t for t, (kind, _) in burst.outcomes.items() if kind == "transactional"}
    orders = _orders(transactional)
    for token, (kind, outcome) in burst.outcomes.items():
        count = runs.get(token, 0)
        what = f"{token} ({kind}, defer said {outcome}) ran {count} times"
        if kind == "idempotent":
            assert count == 1, what  # deferred again after errors: still once
        elif outcome == "ok":
            assert count >= 1 if kind == "inline" else count == 1, what
        elif outcome == "unknown":
            assert count <= 1, what
        else:
            assert count == 0, what
        if kind == "transactional":
            assert orders.get(token, 0) == count, f"{what}, its order written {orders.get(token)}"


def test_burst_under_lost_replies_and_resets_keeps_every_promise(faulty: Proxies, log: str) -> None:
    """Answers lost after the work was done (15 % of Datastore's, 10 % of Cloud Tasks'), and
    1 % of all chunks reset, either way."""
    faulty.datastore.lost_reply_rate = 0.15
    faulty.tasks.lost_reply_rate = 0.10
    for proxy in (faulty.datastore, faulty.tasks):
        proxy.reset_rate = 0.01
    burst = Burst(log)
    started = time.monotonic()
    burst.run(KINDS, per_kind=12, prefix="lossy")
    elapsed = time.monotonic() - started
    injected = {
        "datastore": dict(faulty.datastore.counts),
        "tasks": dict(faulty.tasks.counts),
    }
    runs = _recover_and_count(burst, faulty)
    summary = {outcome: len(burst.tokens(outcome)) for outcome in ("ok", "unknown", "refused")}
    print(f"\nlossy burst: {summary} in {elapsed:.1f}s, faults injected {injected}")
    assert injected["datastore"]["lost_replies"] + injected["datastore"]["resets"] > 0
    assert injected["tasks"]["lost_replies"] + injected["tasks"]["resets"] > 0
    _check_promises(burst, runs)
    for kind in KINDS:
        assert any(k == kind and o == "ok" for k, o in burst.outcomes.values()), kind


def test_latency_loses_nothing_and_duplicates_nothing(faulty: Proxies, log: str) -> None:
    """150 ms added to every chunk each way on both emulators: every defer returns, every
    task runs once."""
    faulty.datastore.latency = faulty.tasks.latency = 0.15
    burst = Burst(log)
    burst.run(KINDS, per_kind=2, prefix="slow")
    assert burst.tokens("unknown", "refused") == set()
    runs = _recover_and_count(burst, faulty)
    _check_promises(burst, runs)
    assert all(count == 1 for count in runs.values()), runs


@pytest.mark.parametrize("side", ["datastore", "tasks"])
def test_blackhole_fails_within_the_deadline_and_what_was_held_runs_at_most_once(
    faulty: Proxies, log: str, side: str
) -> None:
    """Nothing answers: a spilled defer (Datastore side) or an inline one (Cloud Tasks side)
    gives up within its deadlines, as EnqueueOutcomeUnknown since the request may land when
    the network is back (the proxy then delivers what it held); it runs at most once."""
    proxy = faulty.datastore if side == "datastore" else faulty.tasks
    kind = "spilled" if side == "datastore" else "inline"
    proxy.blackhole = True
    started = time.monotonic()
    outcome = _outcome(lambda: _defer_one(kind, log, f"hole-{side}"))
    elapsed = time.monotonic() - started
    # datastore: the commit (2 s) and the read-back, retried once (2 x 2 s + ndb's pause);
    # tasks: one CreateTask deadline (2 s).
    assert elapsed < (8.0 if side == "datastore" else 4.0), elapsed
    assert outcome == "unknown"
    burst = Burst(log, {f"hole-{side}": (kind, outcome)})
    runs = _recover_and_count(burst, faulty)
    _check_promises(burst, runs)


def test_sweeper_racing_the_task_it_repairs_leaves_it_done(faulty: Proxies, log: str) -> None:
    """Transactional defers whose CreateTask fails (every Cloud Tasks connection reset): their
    records are pending. The sweep's Datastore calls then crawl (300 ms per chunk) while
    Cloud Tasks answers at once, so each task runs before the sweep notes its repair. Each
    runs once, and no record comes back: a second sweep finds nothing."""
    faulty.tasks.reset_rate = 1.0
    tokens = [f"race-{number}" for number in range(4)]
    for token in tokens:
        assert _outcome(lambda t=token: _defer_one("transactional", log, t)) == "ok"
    faulty.tasks.reset_rate = 0.0
    # gRPC backs off before it reconnects after so many resets.
    wait_until_tasks_answer()
    faulty.datastore.latency = 0.3
    later = spillover.now() + datetime.timedelta(days=1)
    report = gae_deferred.sweep(now=later)
    assert report.reenqueued >= len(tokens) and report.errors == []
    faulty.calm()
    wait_for_ids(log, tokens, timeout=30)
    with datastore():
        left = [
            r
            for r in spillover.DeferredPayload.query(spillover.DeferredPayload.queue == QUEUE)
            if r.state == "pending"
        ]
    assert left == []
    assert report.finished_meanwhile >= 1, report
    assert gae_deferred.sweep(now=later + datetime.timedelta(days=1)).reenqueued == 0
    time.sleep(1.0)
    assert all(rel_tasks.read_log(log)[token] == 1 for token in tokens)


def _task_body(task: gae_deferred.DeferredTask) -> bytes:
    request = {"name": task.path, "response_view": "FULL"}
    return cloud_tasks.client().get_task(request=request).app_engine_http_request.body


@pytest.mark.parametrize(
    ("kind", "statuses", "runs"),
    [
        ("spilled", [200, 503], 1),
        ("idempotent", [200, 503], 1),
        ("idempotent-transactional", [200, 503], 1),
        ("inline", [200, 200], 3),
    ],
)
def test_duplicate_delivered_while_the_first_runs(
    rel: LocalStack, log: str, kind: str, statuses: list[int], runs: int
) -> None:
    """The same task delivered twice at once to gunicorn: spilled and @idempotent tasks run
    once (the second answer is 503 "claimed", and Cloud Tasks' own delivery later is a
    no-op); an inline task without @idempotent runs on every delivery, the two and Cloud
    Tasks' own (at-least-once, as documented)."""
    token = f"twice-{kind}"
    function = {
        "spilled": rel_tasks.slow_start,
        "idempotent": rel_tasks.slow_start_once,
        "idempotent-transactional": rel_tasks.slow_start_once_in_transaction,
        "inline": rel_tasks.slow_start,
    }[kind]
    extra = (os.urandom(150_000),) if kind == "spilled" else ()
    cloud_tasks.pause_queue("outbox")
    try:
        task = defer(function, log, token, 2.0, *extra, _queue="outbox")
        body = _task_body(task)
        url = rel.app_url + "/_ah/queue/deferred"
        headers = {"X-AppEngine-QueueName": "outbox", "X-AppEngine-TaskName": task.name}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(requests.post, url, data=body, headers=headers, timeout=30)
            wait_for(lambda: rel_tasks.read_log(log, "start")[token], "the first delivery")
            second = pool.submit(requests.post, url, data=body, headers=headers, timeout=30)
            answered = [first.result().status_code, second.result().status_code]
    finally:
        cloud_tasks.resume_queue("outbox")
    assert answered == statuses
    # Cloud Tasks now delivers the real task too: done already, nothing more runs.
    wait_for(lambda: not _queued("outbox", task.name), "the queued task to be delivered")
    time.sleep(0.5)
    assert rel_tasks.read_log(log)[token] == runs


def _queued(queue: str, name: str) -> bool:
    return any(
        cloud_tasks.short_name(t.name) == name
        for t in cloud_tasks.client().list_tasks(parent=cloud_tasks.queue_path(queue))
    )
