"""Polling and inspection helpers for the end-to-end tests (run in the test process)."""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import e2e_tasks

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], what: str, timeout: float = 20.0, interval: float = 0.1
) -> T:
    """Poll until ``predicate()`` is truthy and return it; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_for_runs(
    run_dir: pathlib.Path, label: str, count: int, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Wait until ``label`` has run at least ``count`` times; returns the runs by attempt."""

    def enough() -> list[dict[str, Any]] | None:
        found = e2e_tasks.runs(run_dir, label)
        return found if len(found) >= count else None

    return wait_for(enough, f"{count} run(s) of {label!r}", timeout)


@contextlib.contextmanager
def datastore() -> Iterator[None]:
    """An ndb context on gae_deferred's client (the stack's Datastore emulator)."""
    from gae_deferred._datastore import client

    with client().context(cache_policy=False, global_cache_policy=False):
        yield


def failure_state(queue: str, task_name: str) -> str | None:
    """State of the failure record of a task, or None if there is none."""
    from gae_deferred import failures

    with datastore():
        record = failures.get(failures.failure_id(queue, task_name))
    return record.state if record else None


def payload_exists(payload_id: str) -> bool:
    from gae_deferred import spillover

    with datastore():
        return spillover.get(payload_id) is not None


def queued_tasks(queue: str) -> list[Any]:
    """Tasks Cloud Tasks still holds in a queue."""
    from gae_deferred._tasks_client import tasks_client
    from gae_deferred.enqueue import queue_path

    return list(tasks_client().list_tasks(parent=queue_path(queue)))
