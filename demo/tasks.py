"""The functions the demo page defers. They run in the app, so they live in an importable module.

Each run is logged and recorded as a ``DemoRun`` entity, which the demo page lists::

    from gae_deferred import defer
    from demo import tasks as demo_tasks

    defer(demo_tasks.quick, "hello")
"""

from __future__ import annotations

import datetime
import logging

from google.cloud import ndb

import gae_deferred
from gae_deferred import PermanentTaskFailure

logger = logging.getLogger("gae_deferred.demo")

#: Attempts the flaky task fails before it succeeds.
FLAKY_FAILURES = 2


class DemoRun(ndb.Model):
    """One execution of a demo task: which task, which attempt, what it did."""

    _use_cache = False
    _use_global_cache = False

    kind = ndb.StringProperty()
    task_name = ndb.StringProperty()
    queue = ndb.StringProperty()
    retry_count = ndb.IntegerProperty()
    outcome = ndb.StringProperty()
    detail = ndb.TextProperty()
    when = ndb.DateTimeProperty(tzinfo=datetime.UTC)


def record_run(kind: str, outcome: str, detail: str = "") -> None:
    """Store a DemoRun for the current task (runs inside the task handler's ndb context)."""
    logger.info("demo task %s (%s): %s %s", kind, gae_deferred.task_name(), outcome, detail)
    DemoRun(
        kind=kind,
        task_name=gae_deferred.task_name(),
        queue=gae_deferred.queue_name(),
        retry_count=gae_deferred.task_retry_count(),
        outcome=outcome,
        detail=detail[:200],
        when=datetime.datetime.now(datetime.UTC),
    ).put()


def quick(message: str) -> None:
    """Returns at once: the task handler answers 200 with no Datastore RPC of its own."""
    record_run("quick", "ok", message)


def consume(kind: str, payload: bytes) -> None:
    """Takes a big argument: spilled to Datastore (600 KB) or chunked (3 MB) by defer()."""
    record_run(kind, "ok", f"received {len(payload):,} bytes")


def flaky(kind: str = "flaky") -> None:
    """Fails on its first FLAKY_FAILURES attempts, then succeeds: the failure gets resolved."""
    attempt = gae_deferred.task_retry_count()
    if attempt < FLAKY_FAILURES:
        record_run(kind, "failed", f"attempt {attempt + 1}")
        raise RuntimeError(f"flaky demo task fails attempt {attempt + 1} of {FLAKY_FAILURES + 1}")
    record_run(kind, "ok", f"succeeded on attempt {attempt + 1}")


def always_fails(kind: str = "always-fails") -> None:
    """Raises every time: retried with backoff until queue.yaml's task_retry_limit, then dead."""
    record_run(kind, "failed", f"attempt {gae_deferred.task_retry_count() + 1}")
    raise ValueError("this demo task always fails")


def permanent(kind: str = "permanent") -> None:
    """PermanentTaskFailure: answered 200, never retried, recorded as permanent."""
    record_run(kind, "failed", "PermanentTaskFailure")
    raise PermanentTaskFailure("this demo task gives up at once")
