"""Queues and tasks on the dashboard, through the Cloud Tasks gateway."""

from __future__ import annotations

import dataclasses
import datetime
import os
import urllib.parse
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import tasks_v2
from google.rpc import code_pb2

from .. import audit, cloud_tasks, envelope
from .._config import settings
from ..errors import (
    BadRequest,
    Error,
    NotFound,
)
from ..queue_config import QueueDefinition, load_queue_yaml
from ._common import (
    _PAGE_TOKEN,
    _TASK,
    PAGE_SIZE,
    TASK_SCAN,
    Page,
    QueueInfo,
    _cloud_tasks,
    _iso,
    _now,
    check_queue_name,
    deferred_by,
)
from .header import header_rows


def _queue_definitions() -> dict[str, QueueDefinition]:
    path = settings().queue_yaml
    if not path or not os.path.exists(path):
        return {}
    return load_queue_yaml(path)


def _retry_json(definition: QueueDefinition | None, queue: tasks_v2.Queue | None) -> dict:
    """The retry policy in Cloud Tasks' terms (queue.yaml's when Cloud Tasks has no queue)."""
    if queue is not None and "retry_config" in queue:
        config = queue.retry_config
        return {
            "max_attempts": config.max_attempts,
            "max_retry_duration": _seconds(config.max_retry_duration),
            "min_backoff": _seconds(config.min_backoff),
            "max_backoff": _seconds(config.max_backoff),
            "max_doublings": config.max_doublings,
        }
    if definition is not None:
        retry = definition.retry
        return {
            "max_attempts": (
                retry.task_retry_limit + 1 if retry.task_retry_limit is not None else -1
            ),
            "max_retry_duration": retry.task_age_limit or 0.0,
            "min_backoff": retry.min_backoff_seconds,
            "max_backoff": retry.max_backoff_seconds,
            "max_doublings": retry.max_doublings,
        }
    return {}


def _seconds(value: Any) -> float | None:
    return value.total_seconds() if isinstance(value, datetime.timedelta) else None


def _backlog(queue: str) -> tuple[int, bool, float | None]:
    tasks, next_token = cloud_tasks.list_tasks_page(queue, page_size=TASK_SCAN)
    now = _now()
    created = [task.create_time for task in tasks if task.create_time]
    oldest = (now - min(created)).total_seconds() if created else None
    return len(tasks), next_token is not None, oldest


def queue_overview() -> list[QueueInfo]:
    """Every queue in queue.yaml or Cloud Tasks, with its state and backlog.

    The backlog is the first ListTasks page (BASIC view, TASK_SCAN tasks): "1000+" beyond.
    A queue Cloud Tasks cannot describe is listed with the error instead of failing the page.
    """
    definitions = _queue_definitions()
    live: dict[str, tasks_v2.Queue] = {}
    error = None
    try:
        for queue in cloud_tasks.list_queues():
            live[cloud_tasks.short_name(queue.name)] = queue
    except api_exceptions.GoogleAPIError as exc:
        error = f"Cloud Tasks: {exc}"
    infos = []
    for name in sorted(set(definitions) | set(live)):
        definition, queue = definitions.get(name), live.get(name)
        info = QueueInfo(
            name=name,
            state=queue.state.name if queue is not None else ("UNKNOWN" if error else "MISSING"),
            rate=(
                definition.rate_text
                if definition is not None
                else f"{queue.rate_limits.max_dispatches_per_second:g}/s"
            ),
            max_concurrent=(
                queue.rate_limits.max_concurrent_dispatches
                if queue is not None
                else definition.max_concurrent_requests
            ),
            retry=_retry_json(definition, queue),
            tasks=None,
            tasks_capped=False,
            oldest_task_age=None,
            in_queue_yaml=definition is not None,
            error=error if queue is None else None,
        )
        if queue is not None:
            try:
                info.tasks, info.tasks_capped, info.oldest_task_age = _backlog(name)
            except api_exceptions.GoogleAPIError as exc:
                info.error = f"Cloud Tasks: {exc}"
        elif error is None:
            info.error = "not in Cloud Tasks: run `python -m gae_deferred.queues sync`"
        infos.append(info)
    return infos


def queue_json(queue: QueueInfo) -> dict[str, Any]:
    """The API view of a queue."""
    return dataclasses.asdict(queue)


def get_queue(queue: str) -> tasks_v2.Queue:
    """The Cloud Tasks queue; NotFound for a name that is not a queue."""
    check_queue_name(queue)
    return _cloud_tasks(lambda: cloud_tasks.get_queue(queue))


def list_tasks(queue: str, *, page_token: str | None = None, limit: int = PAGE_SIZE) -> Page:
    """One ListTasks page (BASIC view: no bodies) and the page token of the next."""
    get_queue(queue)
    if page_token and not _PAGE_TOKEN.match(page_token):
        raise BadRequest("the cursor is malformed")
    tasks, next_token = _cloud_tasks(
        lambda: cloud_tasks.list_tasks_page(queue, page_size=limit, page_token=page_token or "")
    )
    return Page(tasks, next_token)


def response_text(code: int, message: str) -> str:
    """What an attempt's answer says to a person: Cloud Tasks' message (``HTTP 500``), or the
    gRPC status name when there is none (``DEADLINE_EXCEEDED``). ``code`` is a google.rpc
    code (13 for any HTTP 5xx), not an HTTP status: printing it as "13 HTTP 500" misleads."""
    if message:
        return message
    try:
        return code_pb2.Code.Name(code)
    except ValueError:
        return f"status {code}"


def _attempt_json(task: tasks_v2.Task, field: str) -> dict[str, Any] | None:
    if field not in task:
        return None
    attempt = getattr(task, field)
    response = None
    if "response_status" in attempt:
        status = attempt.response_status
        response = {
            "code": status.code,
            "message": status.message,
            "text": response_text(status.code, status.message),
        }
    return {
        "dispatch_time": _iso(attempt.dispatch_time) if "dispatch_time" in attempt else None,
        "response_time": _iso(attempt.response_time) if "response_time" in attempt else None,
        "response": response,
    }


def _request_of(task: tasks_v2.Task) -> tuple[Any, str | None, str | None]:
    """The task's request (App Engine or HTTP target: docs/cloud-run.md), its URL as shown,
    and the path it is delivered to; (None, None, None) for neither."""
    if "app_engine_http_request" in task:
        request = task.app_engine_http_request
        return request, request.relative_uri, request.relative_uri
    if "http_request" in task:
        request = task.http_request
        return request, request.url, urllib.parse.urlsplit(request.url).path
    return None, None, None


def task_json(task: tasks_v2.Task) -> dict[str, Any]:
    """The API view of a Cloud Tasks task (BASIC view: no body, no headers)."""
    last = _attempt_json(task, "last_attempt")
    _, url, path = _request_of(task)
    return {
        "name": task.name.rsplit("/", 1)[-1],
        "path": task.name,
        "schedule_time": _iso(task.schedule_time) if "schedule_time" in task else None,
        "create_time": _iso(task.create_time) if "create_time" in task else None,
        "dispatch_count": task.dispatch_count,
        "response_count": task.response_count,
        "last_response": last["response"] if last else None,
        "last_attempt_time": last["dispatch_time"] if last else None,
        "url": url,
        "function": _function_of(path) if path is not None else None,
    }


def _function_of(url: str) -> str | None:
    """The function a gae_deferred task runs, as its URL names it (``<task_url>/<function>``,
    unsafe characters as ``_``); None for another URL. A list shows it without reading bodies
    (ListTasks' BASIC view has none); the task page reads it from the envelope."""
    base = settings().task_url.rstrip("/") + "/"
    path = url.split("?", 1)[0]
    if not path.startswith(base) or len(path) == len(base) or "/" in path[len(base) :]:
        return None
    return path[len(base) :]


def _check_task(queue: str, task: str) -> None:
    check_queue_name(queue)
    if not isinstance(task, str) or not _TASK.match(task):
        raise NotFound(f"no task named {task!r}")


def _time_from_ms(value: Any) -> datetime.datetime | None:
    """An unsigned header's milliseconds since the epoch as a time, or None when it is not a
    whole number or lies outside what a datetime can hold (anyone may write this header)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    try:
        return datetime.datetime.fromtimestamp(value / 1000, datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return None


def envelope_summary(body: bytes) -> dict[str, Any] | None:
    """What a task body's envelope header says, unverified and never unpickled: for display.

    None when the body is not a gae_deferred envelope.
    """
    try:
        header = envelope.read_header(body)
    except Error:
        return None
    if not isinstance(header, dict):
        return None
    ref = header.get("ref") if isinstance(header.get("ref"), dict) else None
    created = _time_from_ms(header.get("created_ms"))
    return {
        "function": header.get("function"),
        "args": header.get("args"),
        "raw_bytes": header.get("raw_bytes"),
        "body_bytes": header.get("body_bytes"),
        "created": _iso(created),
        "app_version": header.get("app_version"),
        "python": header.get("python"),
        "cloudpickle": header.get("cloudpickle"),
        "serializer": header.get("serializer"),
        "retry": header.get("retry"),
        "spilled": ref is not None,
        "payload_id": str(ref.get("id")) if ref else None,
        "stored_bytes": ref.get("stored_bytes") if ref else None,
        "deferred_by": deferred_by(header),
        "header": header,
        "rows": header_rows(header),
    }


def task_detail(queue: str, task: str) -> dict[str, Any]:
    """One queued task in full (GetTask, FULL view): attempts, URL, headers, routing and its
    envelope header. The body's pickle is never loaded."""
    _check_task(queue, task)
    found = _cloud_tasks(lambda: cloud_tasks.get_task(queue, task, full=True))
    request, _, _ = _request_of(found)
    body = bytes(request.body) if request is not None else b""
    routing = (
        request.app_engine_routing
        if "app_engine_http_request" in found and "app_engine_routing" in request
        else None
    )
    return {
        **task_json(found),
        "queue": queue,
        "first_attempt": _attempt_json(found, "first_attempt"),
        "last_attempt": _attempt_json(found, "last_attempt"),
        "method": request.http_method.name if request is not None else None,
        "headers": dict(request.headers) if request is not None else {},
        "routing": (
            {"service": routing.service, "version": routing.version, "instance": routing.instance}
            if routing is not None
            else {}
        ),
        "body_bytes": len(body),
        "envelope": envelope_summary(body),
    }


def run_task(queue: str, task: str, actor: str) -> None:
    """Dispatch a queued task now (RunTask)."""
    _check_task(queue, task)
    _cloud_tasks(lambda: cloud_tasks.run_task(queue, task))
    audit.record(actor, "run", f"task/{queue}/{task}")


def delete_task(queue: str, task: str, actor: str) -> None:
    """Delete a queued task."""
    _check_task(queue, task)
    _cloud_tasks(lambda: cloud_tasks.delete_task(queue, task))
    audit.record(actor, "delete", f"task/{queue}/{task}")


def pause_queue(queue: str, actor: str) -> None:
    """Stop dispatching (PauseQueue); tasks stay queued and can still be added."""
    check_queue_name(queue)
    _cloud_tasks(lambda: cloud_tasks.pause_queue(queue))
    audit.record(actor, "pause", f"queue/{queue}")


def resume_queue(queue: str, actor: str) -> None:
    """Dispatch again (ResumeQueue)."""
    check_queue_name(queue)
    _cloud_tasks(lambda: cloud_tasks.resume_queue(queue))
    audit.record(actor, "resume", f"queue/{queue}")


def purge_queue(queue: str, actor: str) -> None:
    """Delete every task of the queue (spilled records stay: the sweeper re-enqueues them)."""
    check_queue_name(queue)
    _cloud_tasks(lambda: cloud_tasks.purge_queue(queue))
    audit.record(actor, "purge", f"queue/{queue}")
