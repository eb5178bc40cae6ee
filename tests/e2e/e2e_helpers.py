"""Polling and inspection helpers for the end-to-end tests (run in the test process)."""

from __future__ import annotations

import pathlib
from typing import Any

import e2e_tasks

from tests.stack_support import datastore, wait_for


def wait_for_runs(
    run_dir: pathlib.Path, label: str, count: int, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Wait until ``label`` has run at least ``count`` times; returns the runs by attempt."""

    def enough() -> list[dict[str, Any]] | None:
        found = e2e_tasks.runs(run_dir, label)
        return found if len(found) >= count else None

    return wait_for(enough, f"{count} run(s) of {label!r}", timeout)


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
