"""Polling, fault and reconciliation helpers for the reliability suites (test process only).

ids = {defer_one(i) for i in range(10)}
wait_for_ids(log, ids)
report = reconcile(log, ids, queue="fault")
assert report.lost == set() and report.unexpected == set()
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import rel_tasks

from gae_deferred.local.errors import StackError
from gae_deferred.local.stack import LocalStack
from tests import stack_support
from tests.stack_support import datastore

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.1
) -> T:
    """``stack_support.wait_for`` with a longer default: these suites restart and load the stack."""
    return stack_support.wait_for(predicate, what, timeout, interval)


def retry_until_ok(call: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Call until it stops raising: a client reconnecting to a restarted emulator."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except Exception as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} still failing after {timeout:.0f}s: {exc}") from exc
            time.sleep(0.2)


def wait_for_ids(log: str, ids: Iterable[str], timeout: float = 60.0, event: str = "ran") -> None:
    """Wait until every id in ``ids`` has logged ``event`` at least once."""
    wanted = set(ids)

    def missing() -> set[str]:
        return wanted - set(rel_tasks.read_log(log, event))

    deadline = time.monotonic() + timeout
    while missing():
        if time.monotonic() > deadline:
            left = sorted(missing())
            raise AssertionError(f"{len(left)} task(s) never ran ({event}): {left[:10]}")
        time.sleep(0.2)


def payload_records(queue: str) -> list[Any]:
    """The ``_DeferredPayload`` records of a queue (spilled or outboxed, not yet finished)."""
    from gae_deferred import spillover

    with datastore():
        model = spillover.DeferredPayload
        return model.query(model.queue == queue).fetch()


def failure_records(queue: str) -> list[Any]:
    """The ``_DeferredFailure`` records of a queue."""
    from gae_deferred import failures

    with datastore():
        model = failures.DeferredFailure
        return model.query(model.queue == queue).fetch()


def crash_child(stack: LocalStack, name: str) -> None:
    """kill -9 one emulator (``datastore`` or ``cloudtasks``) without telling the stack."""
    pid = stack.pids()[name]
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: name in stack.dead_children(), f"the {name} emulator to die", timeout=10)


_STARTERS = {"datastore": "start_datastore", "cloudtasks": "start_tasks", "app": "start_app"}
_RESTARTERS = {"datastore": "restart_datastore", "cloudtasks": "restart_tasks"}


def _fork_crash(exc: StackError) -> bool:
    """The child aborted (SIGABRT) before exec: gRPC's fork handlers in a forked copy of this
    process, which has live gRPC channels (Popen forks to start a new session). Rarer since
    LocalStack stopped using ``preexec_fn``, not gone; see docs/reliability.md."""
    return "exited with code -6" in str(exc)


def start_child(stack: LocalStack, name: str, attempts: int = 3) -> None:
    """Start ``app``, ``datastore`` or ``cloudtasks``, again if the fork itself crashed."""
    for attempt in range(attempts):
        try:
            getattr(stack, _STARTERS[name])()
            return
        except StackError as exc:
            if not _fork_crash(exc) or attempt == attempts - 1:
                raise


def restart_child(stack: LocalStack, name: str) -> None:
    """Stop (if still running) and start an emulator on the same port and data dir."""
    try:
        getattr(stack, _RESTARTERS[name])()
    except StackError as exc:
        if not _fork_crash(exc):
            raise
        start_child(stack, name)


def reset_clients() -> None:
    """Fresh gRPC channels: a channel to a dead server backs off before it reconnects."""
    import gae_deferred

    gae_deferred.reset_clients()


def wait_until_datastore_answers() -> None:
    from gae_deferred import spillover

    def probe() -> None:
        with datastore():
            spillover.get("probe")

    retry_until_ok(probe, "Datastore lookup")


def wait_until_tasks_answer() -> None:
    from gae_deferred.cloud_tasks import client as tasks_client, queue_path

    retry_until_ok(lambda: tasks_client().get_queue(name=queue_path("default")), "GetQueue")


@dataclasses.dataclass
class Reconciliation:
    """Deferred ids against what ran, what is still pending and what is dead."""

    deferred: int
    ran: int
    duplicates: int
    lost: set[str]
    unexpected: set[str]
    pending_records: int
    failure_states: dict[str, int]


def reconcile(log: str, ids: Iterable[str], queue: str, *, gave_up: Iterable[str] = ()) -> Any:
    """Every deferred id ran (or gave up for good) and nothing else ran.

    ``gave_up`` ids are expected to log ``gave-up`` instead of ``ran``; ``lost`` lists ids that
    did neither, ``unexpected`` ids that ran without being deferred.
    """
    deferred = set(ids)
    gave_up = set(gave_up)
    ran = rel_tasks.read_log(log, "ran")
    finished = set(ran) | set(rel_tasks.read_log(log, "gave-up"))
    states: dict[str, int] = {}
    for record in failure_records(queue):
        states[record.state] = states.get(record.state, 0) + 1
    pending = [r for r in payload_records(queue) if r.state in ("pending", "retrying")]
    return Reconciliation(
        deferred=len(deferred),
        ran=len(set(ran) & deferred),
        duplicates=sum(count - 1 for count in ran.values() if count > 1),
        lost=(deferred - finished) | (gave_up - set(rel_tasks.read_log(log, "gave-up"))),
        unexpected=finished - deferred,
        pending_records=len(pending),
        failure_states=states,
    )
