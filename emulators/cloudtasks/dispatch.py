"""HTTP delivery of App Engine tasks and the retry arithmetic of Cloud Tasks.

Pure helpers, no emulator state: ``send`` performs one attempt, ``backoff_seconds`` and
``retries_exhausted`` implement RetryConfig's documented semantics::

    backoff_seconds(retry_index=4, min_backoff=10, max_backoff=300, max_doublings=3)  # 160.0
"""

from __future__ import annotations

import http.client
import urllib.parse
from dataclasses import dataclass
from typing import Any

USER_AGENT = "AppEngine-Google; (+http://code.google.com/appengine)"
# grpc status codes Cloud Tasks reports in Attempt.response_status for HTTP outcomes.
_HTTP_TO_RPC = {
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    409: 10,
    429: 8,
    499: 1,
    500: 13,
    501: 12,
    503: 14,
    504: 4,
}
RPC_UNAVAILABLE = 14
RPC_DEADLINE_EXCEEDED = 4


@dataclass(frozen=True)
class AttemptResult:
    """Outcome of one HTTP attempt: status is None when no response came back."""

    status: int | None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def rpc_code(self) -> int:
        if self.status is None:
            return RPC_DEADLINE_EXCEEDED if self.error == "deadline exceeded" else RPC_UNAVAILABLE
        if 200 <= self.status < 300:
            return 0
        return _HTTP_TO_RPC.get(self.status, 13 if self.status >= 500 else 9)

    @property
    def reason(self) -> str:
        """Short text used for X-AppEngine-TaskRetryReason on the next attempt."""
        return self.error if self.status is None else f"HTTP {self.status}"


def send(
    app_url: str,
    method: str,
    relative_uri: str,
    headers: dict[str, str],
    body: bytes,
    deadline: float,
) -> AttemptResult:
    """POST (or the task's method) one task to the app; never raises."""
    base = urllib.parse.urlsplit(app_url)
    path = base.path.rstrip("/") + relative_uri
    conn = http.client.HTTPConnection(
        base.hostname or "127.0.0.1", base.port or 80, timeout=deadline
    )
    try:
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        response.read()
        return AttemptResult(response.status)
    except TimeoutError:
        return AttemptResult(None, "deadline exceeded")
    except (OSError, http.client.HTTPException) as exc:
        return AttemptResult(None, f"connection error: {exc.__class__.__name__}")
    finally:
        conn.close()


def task_headers(prefix: str, queue: str, task: Any) -> dict[str, str]:
    """The task headers of one attempt: ``prefix`` is ``X-AppEngine-`` (App Engine tasks) or
    ``X-CloudTasks-`` (HTTP targets); ``task`` is the emulator's record of the task (its
    ``pb``, ``failures``, ``scheduled``, ``previous_status``, ``retry_reason``)."""
    headers = {
        f"{prefix}QueueName": queue,
        f"{prefix}TaskName": task.pb.name.rsplit("/", 1)[-1],
        f"{prefix}TaskRetryCount": str(task.failures),
        f"{prefix}TaskExecutionCount": str(task.pb.response_count),
        f"{prefix}TaskETA": f"{task.scheduled:.6f}",
    }
    if task.previous_status is not None:
        headers[f"{prefix}TaskPreviousResponse"] = str(task.previous_status)
    if task.retry_reason:
        headers[f"{prefix}TaskRetryReason"] = task.retry_reason
    return headers


def backoff_seconds(
    retry_index: int, min_backoff: float, max_backoff: float, max_doublings: int
) -> float:
    """Delay before retry number ``retry_index`` (0 = first retry).

    min_backoff doubles max_doublings times, then grows linearly by the last doubled
    interval, capped at max_backoff (RetryConfig.max_doublings documentation).
    """
    if retry_index <= max_doublings:
        delay = min_backoff * (2**retry_index)
    else:
        delay = min_backoff * (2**max_doublings) * (retry_index - max_doublings + 1)
    return min(delay, max_backoff)


def retries_exhausted(
    failures: int, max_attempts: int, max_retry_duration: float, since_first_attempt: float
) -> bool:
    """True when Cloud Tasks stops retrying: both limits that are set must be reached."""
    attempts_done = max_attempts != -1 and failures >= max_attempts
    duration_done = max_retry_duration > 0 and since_first_attempt >= max_retry_duration
    if max_attempts == -1:
        return duration_done
    if max_retry_duration <= 0:
        return attempts_done
    return attempts_done and duration_done
