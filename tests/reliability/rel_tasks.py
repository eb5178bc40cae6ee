"""Functions the reliability suites defer. The stack's app imports this module too (the
reliability stack puts tests/reliability on its PYTHONPATH), so calls pickle by reference.

Every run appends one line to a log file the test names: ``<event> <task id> <retry count>
<argument bytes> <pid>``. One ``os.write`` on an ``O_APPEND`` descriptor per line keeps lines
whole with several gunicorn workers and threads writing at once::

    defer(rel_tasks.mark, str(log), "t-17")
    assert rel_tasks.read_log(log)["t-17"] == 1
"""

from __future__ import annotations

import collections
import os
import pathlib
import time

import gae_deferred


def _append(log: str, event: str, task_id: str, size: int = 0) -> None:
    line = f"{event} {task_id} {gae_deferred.task_retry_count()} {size} {os.getpid()}\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def mark(log: str, task_id: str, payload: bytes = b"") -> None:
    """The task ran: record its id (and the size of its payload, to prove it arrived whole)."""
    _append(log, "ran", task_id, len(payload))


def slow_mark(log: str, task_id: str, seconds: float) -> None:
    """Record the start, sleep (the test kills the app meanwhile), then record the run."""
    _append(log, "start", task_id)
    time.sleep(seconds)
    _append(log, "ran", task_id)


def flaky(log: str, task_id: str, failures: int) -> None:
    """Fail the first ``failures`` attempts with a retryable error, then succeed."""
    if gae_deferred.task_retry_count() < failures:
        _append(log, "failed", task_id)
        raise RuntimeError(f"{task_id}: failing attempt {gae_deferred.task_retry_count() + 1}")
    _append(log, "ran", task_id)


def give_up(log: str, task_id: str) -> None:
    """Fail for good: recorded as a permanent failure, never retried."""
    _append(log, "gave-up", task_id)
    raise gae_deferred.PermanentTaskFailure(f"{task_id}: permanent")


@gae_deferred.idempotent(key=lambda log, task_id, payload=b"": task_id)
def mark_once(log: str, task_id: str, payload: bytes = b"") -> None:
    """``mark``, at most once per task id: the caller may defer it again after an error."""
    _append(log, "ran", task_id, len(payload))


def slow_start(log: str, task_id: str, seconds: float, payload: bytes = b"") -> None:
    """Record the start, sleep, record the run: a second delivery arrives while it sleeps."""
    _append(log, "start", task_id)
    time.sleep(seconds)
    _append(log, "ran", task_id, len(payload))


@gae_deferred.idempotent
def slow_start_once(log: str, task_id: str, seconds: float) -> None:
    """``slow_start`` at most once per task (the task's queue and name are the key)."""
    slow_start(log, task_id, seconds)


@gae_deferred.idempotent(transactional=True)
def slow_start_once_in_transaction(log: str, task_id: str, seconds: float) -> None:
    slow_start(log, task_id, seconds)


def canary(path: str) -> None:
    """Side effect the fuzz suite must never see: creates ``path`` if it is ever executed."""
    pathlib.Path(path).write_text("executed\n", encoding="utf-8")


def read_log(log: str | os.PathLike[str], event: str = "ran") -> collections.Counter[str]:
    """How many times each task id logged ``event``."""
    counts: collections.Counter[str] = collections.Counter()
    try:
        text = pathlib.Path(log).read_text(encoding="utf-8")
    except FileNotFoundError:
        return counts
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == event:
            counts[parts[1]] += 1
    return counts


def log_lines(log: str | os.PathLike[str]) -> list[list[str]]:
    """Every complete line of the log, split into fields (a torn line would show here)."""
    try:
        text = pathlib.Path(log).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines()]
