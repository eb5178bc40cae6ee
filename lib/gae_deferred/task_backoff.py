"""A task's own backoff (legacy ``TaskRetryOptions``' ``min_backoff_seconds``,
``max_backoff_seconds``, ``max_doublings``), which Cloud Tasks has no per-task setting for.

A task that sets any of them is retried the legacy way: a failed attempt that may be retried
answers 200 (Cloud Tasks is done with it) and the next attempt is a new task, due after the
task's own backoff, named ``<first task>-r<n>``, whose signed envelope says how many attempts
came before (``retried``). The handler adds that count to Cloud Tasks' headers, so
``task_retry_count()``, the failure record's attempts, the retry limits and the dead letter see
one task across its attempts::

    defer(sync, _retry_options=TaskRetryOptions(task_retry_limit=3, min_backoff_seconds=30))
    # attempt 0 fails -> task d-1f..-r1 due in 30 s, run with task_retry_count() == 1
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Any

from . import defaults, envelope
from .context import TaskInfo

#: The backoff fields of ``_retry_options``; any of them makes the handler schedule retries.
BACKOFF_FIELDS = ("min_backoff_seconds", "max_backoff_seconds", "max_doublings")
#: Legacy's defaults for the fields a task's options leave unset (TaskQueueRetryParameters).
DEFAULTS = {
    "min_backoff_seconds": defaults.MIN_BACKOFF_SECONDS,
    "max_backoff_seconds": defaults.MAX_BACKOFF_SECONDS,
    "max_doublings": defaults.MAX_DOUBLINGS,
}
#: Envelope header field: attempts made before this task (by the tasks it continues).
RETRIED = "retried"
#: Envelope header field: where to send the next attempt of an inline task.
REQUEST = "request"
_SUFFIX = re.compile(r"-r\d+$")


def has_own_backoff(header: dict[str, Any]) -> bool:
    retry = header.get("retry")
    return bool(retry) and any(field in retry for field in BACKOFF_FIELDS)


def backoff_seconds(retry: dict[str, Any], retry_number: int) -> float:
    """Delay before retry ``retry_number`` (1 = the first retry), as legacy's taskqueue
    ``Retry.CalculateBackoffUsec``: doubling ``max_doublings`` times, then linear, capped."""
    values = {**DEFAULTS, **{k: v for k, v in retry.items() if k in BACKOFF_FIELDS}}
    exponent = min(retry_number - 1, int(values["max_doublings"]))
    linear_steps = retry_number - exponent
    delay = float(values["min_backoff_seconds"])
    if exponent > 0:
        delay *= 2 ** min(1023, exponent)
    if linear_steps > 1:
        delay *= linear_steps
    return min(float(values["max_backoff_seconds"]), delay)


def counted(task: TaskInfo, header: dict[str, Any]) -> TaskInfo:
    """``task`` with the attempts of the tasks it continues added to its counts."""
    before = header.get(RETRIED)
    if isinstance(before, bool) or not isinstance(before, int) or before <= 0:
        return task
    return dataclasses.replace(
        task,
        retry_count=task.retry_count + before,
        execution_count=task.execution_count + before,
    )


def next_name(task: TaskInfo) -> str:
    """``<first task>-r<n>``: the same name for the same retry, so a redelivered attempt
    cannot schedule it twice (Cloud Tasks refuses the name)."""
    return f"{_SUFFIX.sub('', task.name)[:480]}-r{task.retry_count + 1}"


def due(task: TaskInfo, header: dict[str, Any]) -> datetime.datetime:
    delay = backoff_seconds(header["retry"], task.retry_count + 1)
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delay)


def inline_retry_body(body: bytes, name: str, failure_id: str, retried: int) -> bytes:
    """The envelope of the next attempt: the same call, bound to its task, counting."""
    return envelope.rebind(bytes(body), task=name, failure_id=failure_id, **{RETRIED: retried})
