"""Load: thousands of tasks of mixed sizes and outcomes through the local stack, reconciled.

Most tasks are small; ~2% spill 150 KB-1.5 MB of random bytes to Datastore; 1% fail (half
raise PermanentTaskFailure, half fail once and then succeed). Every run appends its id to a
log (rel_tasks.mark); the reconciliation demands 0 lost and 0 runs that were not deferred, and
finds every failure as a ``_DeferredFailure`` record. The summary line (tasks/s) is printed:
run with ``-s`` to see it::

    .venv/bin/python -m pytest tests/reliability/test_load.py -s -m slow   # 10,000 tasks
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import random
import time

import pytest
import rel_tasks
from rel_helpers import failure_records, payload_records, reconcile, wait_for

from gae_deferred import defer
from gae_deferred.local.stack import LocalStack
from tests.stack_support import queued_tasks

QUEUE = "load"
THREADS = 4


@dataclasses.dataclass
class Plan:
    """What to defer: task id -> (kind, payload size)."""

    tasks: dict[str, tuple[str, int]]

    def ids(self, kind: str) -> set[str]:
        return {task_id for task_id, (k, _) in self.tasks.items() if k == kind}


def make_plan(count: int, seed: int) -> Plan:
    rng = random.Random(seed)
    tasks: dict[str, tuple[str, int]] = {}
    for number in range(count):
        roll = rng.random()
        if roll < 0.02:
            kind, size = "spill", rng.randint(150 * 1024, 1536 * 1024)
        elif roll < 0.025:
            kind, size = "give_up", 0
        elif roll < 0.03:
            kind, size = "flaky", 0
        else:
            kind, size = "small", rng.randint(0, 2000)
        tasks[f"L{seed}-{number}"] = (kind, size)
    return Plan(tasks)


def _defer_one(log: str, task_id: str, kind: str, size: int) -> str:
    if kind == "give_up":
        task = defer(rel_tasks.give_up, log, task_id, _queue=QUEUE)
    elif kind == "flaky":
        task = defer(rel_tasks.flaky, log, task_id, 1, _queue=QUEUE)
    else:
        # Random bytes, so nothing compresses its way under the spill threshold.
        task = defer(rel_tasks.mark, log, task_id, os.urandom(size), _queue=QUEUE)
        assert task.spilled == (kind == "spill"), (task_id, size)
    return task.name


def run_load(log: str, count: int, seed: int, timeout: float) -> dict[str, float]:
    """Defer ``count`` tasks from THREADS threads, wait for all, reconcile; returns figures."""
    plan = make_plan(count, seed)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        futures = {
            task_id: pool.submit(_defer_one, log, task_id, kind, size)
            for task_id, (kind, size) in plan.tasks.items()
        }
        names = {task_id: future.result() for task_id, future in futures.items()}
    deferred_in = time.monotonic() - started

    ids = set(plan.tasks)
    gave_up = plan.ids("give_up")

    def finished() -> bool:
        done = set(rel_tasks.read_log(log)) | set(rel_tasks.read_log(log, "gave-up"))
        return ids <= done

    wait_for(finished, f"all {count} tasks to run", timeout=timeout, interval=0.5)
    elapsed = time.monotonic() - started
    wait_for(lambda: not queued_tasks(QUEUE), "the load queue to drain", timeout=60)

    report = reconcile(log, ids, QUEUE, gave_up=gave_up)
    assert report.lost == set(), f"lost {len(report.lost)}: {sorted(report.lost)[:10]}"
    assert report.unexpected == set(), f"ran but never deferred: {sorted(report.unexpected)}"
    assert all(len(fields) == 5 for fields in rel_tasks.log_lines(log)), "a torn log line"

    by_name = {record.task_name: record for record in failure_records(QUEUE)}
    for task_id in gave_up:
        assert by_name[names[task_id]].state == "permanent", task_id
    for task_id in plan.ids("flaky"):
        assert by_name[names[task_id]].state == "resolved", task_id
        assert rel_tasks.read_log(log, "failed")[task_id] >= 1
    spilled_names = {names[task_id] for task_id in plan.ids("spill")}
    leftovers = [r for r in payload_records(QUEUE) if r.task_name in spilled_names]
    assert leftovers == [], f"{len(leftovers)} spilled records outlived their tasks"

    figures = {
        "tasks": count,
        "spilled": len(plan.ids("spill")),
        "failing": len(gave_up) + len(plan.ids("flaky")),
        "lost": len(report.lost),
        "duplicates": report.duplicates,
        "defer_seconds": round(deferred_in, 1),
        "total_seconds": round(elapsed, 1),
        "tasks_per_second": round(count / elapsed, 1),
    }
    print(f"\nload figures: {figures}")
    return figures


def test_load_1000_mixed_tasks(rel: LocalStack, log: str) -> None:
    figures = run_load(log, 1000, seed=1, timeout=180)
    assert figures["lost"] == 0


@pytest.mark.slow
def test_load_10000_mixed_tasks(rel: LocalStack, log: str) -> None:
    figures = run_load(log, 10_000, seed=2, timeout=900)
    assert figures["lost"] == 0
