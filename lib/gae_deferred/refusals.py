"""Refused deliveries: every 403 of the task handler, counted per reason, never silent.

A task the handler refuses is retried by Cloud Tasks until its queue gives up (forever on a
queue without a retry limit), and nothing else would say so. Each refusal is counted here per
reason, with the latest examples (queue, task name, reason, when; never the body), and the
legacy pickles the handler ran while draining a python27 queue are counted beside them::

    from gae_deferred import refusals

    refusals.record("bad-signature", task, "envelope signature does not match")
    refusals.summary()   # {"counts": {"bad-signature": 1, ...}, "legacy_runs": 0, "examples": []}

Counting costs a lock in memory, never a Datastore call on the request's path: a timer thread
writes what a process counted into one ``_DeferredRefusals`` record, at most once per
``settings().metrics_flush_seconds`` (60), so a flood of forged requests cannot turn into a
flood of Datastore writes. The dashboard adds the counts its own process has not written yet.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import threading
import time
from typing import Any

from google.cloud import ndb

from ._config import settings
from ._datastore import ndb_context
from ._model import DeferredModel
from .context import TaskInfo

logger = logging.getLogger("gae_deferred")

#: Why the handler answered 403 (the dashboard's words for them).
REASONS = {
    "not-from-queue": "no task queue headers",
    "unsigned": "unsigned body (not an envelope)",
    "bad-signature": "bad signature or unknown key",
    "wrong-task": "envelope made for another task or queue",
    "legacy-pickle": "legacy pickle outside the drain window",
    "bad-token": "HTTP target: OIDC token missing, bad, expired, or for another audience/account",
}
#: Examples kept, newest first.
MAX_EXAMPLES = 20
_MESSAGE_CHARS = 300
_RECORD_ID = "totals"


class DeferredRefusals(DeferredModel):
    """Counts of refused deliveries and legacy runs, for all processes together."""

    counts = ndb.JsonProperty(indexed=False)
    legacy_runs = ndb.IntegerProperty(default=0, indexed=False)
    examples = ndb.JsonProperty(indexed=False)
    updated = ndb.DateTimeProperty(tzinfo=datetime.UTC, indexed=False)


class _Pending:
    """What this process saw since its last write."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.legacy_runs = 0
        self.examples: list[dict[str, Any]] = []
        # The first write waits a flush interval after start-up too.
        self.last_write = time.monotonic()
        self.timer: threading.Timer | None = None

    def take(self) -> tuple[dict[str, int], int, list[dict[str, Any]]]:
        taken = (self.counts, self.legacy_runs, self.examples)
        self.counts, self.legacy_runs, self.examples = {}, 0, []
        return taken


_pending = _Pending()


def _forked() -> None:
    """A forked child (a gunicorn worker) starts its own counts: its parent's timer thread did
    not come along, and the parent writes what it counted itself."""
    global _pending
    _pending = _Pending()


os.register_at_fork(after_in_child=_forked)


def record(reason: str, task: TaskInfo | None, message: str) -> None:
    """Count one refused delivery (a 403) and keep it as an example."""
    if reason not in REASONS:
        raise ValueError(f"unknown refusal reason {reason!r}")
    example = {
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "reason": reason,
        "queue": task.queue if task else None,
        "task_name": task.name if task else None,
        "message": message[:_MESSAGE_CHARS],
    }
    with _pending.lock:
        _pending.counts[reason] = _pending.counts.get(reason, 0) + 1
        _pending.examples = [example, *_pending.examples][:MAX_EXAMPLES]
    _write_soon()


def legacy_run() -> None:
    """Count one legacy pickle the handler ran (the python27 drain)."""
    with _pending.lock:
        _pending.legacy_runs += 1
    _write_soon()


def _write_soon() -> None:
    """Arm the one timer that writes this process's counts, a flush interval after the last
    write (at once when there was none for that long)."""
    with _pending.lock:
        if _pending.timer is not None:
            return
        interval = settings().metrics_flush_seconds
        wait = max(0.0, _pending.last_write + interval - time.monotonic())
        _pending.timer = threading.Timer(wait, flush)
        _pending.timer.daemon = True
        _pending.timer.start()


def flush() -> None:
    """Fold what this process counted into the shared record (one transaction)."""
    with _pending.lock:
        if _pending.timer is not None:
            _pending.timer.cancel()
            _pending.timer = None
        counts, runs, examples = _pending.take()
        _pending.last_write = time.monotonic()
    if not counts and not runs:
        return
    try:
        with ndb_context():
            ndb.transaction(lambda: _fold(counts, runs, examples), retries=3)
    except Exception:
        # The counts are the only trace of these refusals: keep them for the next write.
        logger.exception("could not write refused-delivery counts; kept for the next write")
        with _pending.lock:
            for reason, count in counts.items():
                _pending.counts[reason] = _pending.counts.get(reason, 0) + count
            _pending.legacy_runs += runs
            _pending.examples = [*_pending.examples, *examples][:MAX_EXAMPLES]


def _fold(counts: dict[str, int], runs: int, examples: list[dict[str, Any]]) -> None:
    key = ndb.Key(DeferredRefusals, _RECORD_ID)
    stored = key.get() or DeferredRefusals(key=key, counts={}, examples=[])
    totals = dict(stored.counts or {})
    for reason, count in counts.items():
        totals[reason] = totals.get(reason, 0) + count
    stored.counts = totals
    stored.legacy_runs = (stored.legacy_runs or 0) + runs
    stored.examples = [*examples, *(stored.examples or [])][:MAX_EXAMPLES]
    stored.updated = datetime.datetime.now(datetime.UTC)
    stored.put()


def summary() -> dict[str, Any]:
    """Every process's counts as written (one Lookup), with this process's pending ones."""
    stored = ndb.Key(DeferredRefusals, _RECORD_ID).get()
    counts = dict.fromkeys(REASONS, 0)
    counts.update((stored.counts or {}) if stored else {})
    with _pending.lock:
        for reason, count in _pending.counts.items():
            counts[reason] = counts.get(reason, 0) + count
        runs = (stored.legacy_runs or 0 if stored else 0) + _pending.legacy_runs
        examples = [*_pending.examples, *((stored.examples or []) if stored else [])]
    return {
        "counts": counts,
        "total": sum(counts.values()),
        "legacy_runs": runs,
        "examples": examples[:MAX_EXAMPLES],
        "reasons": REASONS,
    }


def discard_pending() -> None:
    """Forget what this process has not written (tests)."""
    with _pending.lock:
        if _pending.timer is not None:
            _pending.timer.cancel()
            _pending.timer = None
        _pending.take()


atexit.register(flush)
