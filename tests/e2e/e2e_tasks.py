"""Functions the end-to-end tests defer. The app imports this module too (the stack puts
tests/e2e on its PYTHONPATH), so tasks pickle by reference like any app function.

Every run writes ``<run_dir>/<label>.<retry_count>.json``; tests poll for those files::

    defer(e2e_tasks.record, str(run_dir), "small")
    runs = wait_for_runs(run_dir, "small", 1)
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import gae_deferred


def record(run_dir: str, label: str, *args: Any) -> None:
    """Write one run file: attempt number, task name and queue, time, size of the arguments."""
    retry = gae_deferred.task_retry_count()
    task = gae_deferred.current_task()
    data = {
        "label": label,
        "retry_count": retry,
        "task_name": gae_deferred.task_name(),
        "queue": gae_deferred.queue_name(),
        "time": time.time(),
        "arg_bytes": sum(len(a) for a in args if isinstance(a, bytes | str)),
        "pid": os.getpid(),
        # False for HTTP-target tasks (X-CloudTasks-* headers after a verified OIDC token).
        "app_engine": task.app_engine if task else None,
    }
    target = pathlib.Path(run_dir) / f"{label}.{retry}.json"
    partial = target.with_suffix(".tmp")
    # Written then renamed: a polling test never reads half a file.
    partial.write_text(json.dumps(data), encoding="utf-8")
    os.replace(partial, target)


def fail_until(run_dir: str, label: str, failures: int) -> None:
    """Record the attempt, then raise on the first ``failures`` attempts."""
    record(run_dir, label)
    if gae_deferred.task_retry_count() < failures:
        raise RuntimeError(f"{label}: failing attempt {gae_deferred.task_retry_count() + 1}")


def always_fail(run_dir: str, label: str) -> None:
    record(run_dir, label)
    raise ValueError(f"{label}: always fails")


def give_up(run_dir: str, label: str) -> None:
    record(run_dir, label)
    raise gae_deferred.PermanentTaskFailure(f"{label}: permanent")


def runs(run_dir: pathlib.Path, label: str) -> list[dict[str, Any]]:
    """The runs recorded so far for a label, by attempt."""
    found = []
    for path in sorted(run_dir.glob(f"{label}.*.json")):
        found.append(json.loads(path.read_text(encoding="utf-8")))
    return sorted(found, key=lambda run: run["retry_count"])
