"""Which request deferred a task: its trace travels with the task, and into the logs.

``defer()`` has no request object, so a small WSGI middleware keeps the current request's
trace in a context variable while the app handles it::

    from gae_deferred import tracing

    app = tracing.TraceMiddleware(app)     # or gae_deferred.webapp2.deferred_middleware(app)
    tracing.configure_logging()            # App Engine: structured JSON lines with the trace

Then every ``defer()`` made while handling a request records ``{"request": {"path",
"trace_id", "span_id"}}`` in the envelope header (the dashboard shows "deferred by <path>" and a
Cloud Logging link) and sends ``traceparent: 00-<trace id>-<span id>-<flags>`` on the task, so
the task request joins the same trace; through the middleware the task request is itself the
current request, so what the task defers stays in that trace too.

Trace headers read, first found wins: W3C ``traceparent``, then App Engine's
``X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=1`` (span id in decimal). A request with neither
gets a fresh random trace id, so tasks deferred locally can still be followed.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import re
from collections.abc import Callable, Iterable
from typing import Any

from ._config import settings

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_CLOUD_TRACE = re.compile(r"^([0-9a-fA-F]{32})(?:/(\d{1,20}))?(?:;o=([01]))?$")
#: Paths are kept for display; a path longer than this is cut.
MAX_PATH_CHARS = 200
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class RequestTrace:
    """The request being handled: its path and its trace (32 and 16 lowercase hex digits).

    A request that brought no trace header gets random ids, made when first needed: most task
    requests never defer, and this is built for every one of them.
    """

    __slots__ = ("_span_id", "_trace_id", "path", "sampled")

    def __init__(
        self, path: str, trace_id: str | None, span_id: str | None, sampled: bool = False
    ) -> None:
        self.path = path
        self._trace_id = trace_id
        self._span_id = span_id
        self.sampled = sampled

    @property
    def trace_id(self) -> str:
        if self._trace_id is None:
            self._trace_id = _random_hex(128)
        return self._trace_id

    @property
    def span_id(self) -> str:
        if self._span_id is None:
            self._span_id = _random_hex(64)
        return self._span_id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestTrace):
            return NotImplemented
        mine = (self.path, self.trace_id, self.span_id, self.sampled)
        return mine == (other.path, other.trace_id, other.span_id, other.sampled)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RequestTrace({self.path!r}, {self.trace_id!r}, {self.span_id!r}, {self.sampled})"

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` header that makes a task request a child of this request."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def header_fields(self) -> dict[str, Any]:
        """What ``defer()`` adds to the envelope header."""
        return {"request": {"path": self.path, "trace_id": self.trace_id, "span_id": self.span_id}}


def _from_traceparent(value: str) -> tuple[str, str, bool] | None:
    match = _TRACEPARENT.match(value.strip().lower())
    if not match or match.group(1) == _ZERO_TRACE or match.group(2) == _ZERO_SPAN:
        return None
    return match.group(1), match.group(2), bool(int(match.group(3), 16) & 1)


def _from_cloud_trace(value: str) -> tuple[str, str, bool] | None:
    match = _CLOUD_TRACE.match(value.strip())
    if not match or match.group(1) == _ZERO_TRACE:
        return None
    span = int(match.group(2) or 0) % (1 << 64)
    span_id = f"{span:016x}" if span else _random_hex(64)
    return match.group(1).lower(), span_id, match.group(3) == "1"


def _random_hex(bits: int) -> str:
    # Trace and span ids need to be unique, not secret: random's generator is several times
    # cheaper than secrets', and every request without a trace header makes two.
    return f"{random.getrandbits(bits) or 1:0{bits // 4}x}"


def from_environ(environ: dict[str, Any]) -> RequestTrace:
    """The trace of a WSGI request (a new random one when it carries no trace header)."""
    traceparent = environ.get("HTTP_TRACEPARENT")
    cloud_trace = environ.get("HTTP_X_CLOUD_TRACE_CONTEXT")
    found = (traceparent and _from_traceparent(traceparent)) or (
        cloud_trace and _from_cloud_trace(cloud_trace)
    )
    trace_id, span_id, sampled = found or (None, None, False)
    # PEP 3333: PATH_INFO holds the raw bytes as latin-1; show them as the UTF-8 they were.
    raw = (environ.get("SCRIPT_NAME") or "") + (environ.get("PATH_INFO") or "")
    path = raw.encode("latin-1", "replace").decode("utf-8", "replace")[:MAX_PATH_CHARS]
    return RequestTrace(path or "/", trace_id, span_id, sampled)


_current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "gae_deferred_request", default=None
)


def current() -> RequestTrace | None:
    """The request being handled in this context, or None (a script, a cron-less thread)."""
    return _current.get()


class request_scope:
    """Make ``trace`` the current request for the block (a class: it runs on every request)::

    with tracing.request_scope(tracing.from_environ(environ)):
        defer(work)          # carries the request's trace
    """

    __slots__ = ("_token", "_trace")

    def __init__(self, trace: RequestTrace) -> None:
        self._trace = trace

    def __enter__(self) -> RequestTrace:
        self._token = _current.set(self._trace)
        return self._trace

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


def envelope_fields() -> dict[str, Any]:
    """Envelope header fields for a task deferred now (empty outside a request)."""
    trace = _current.get()
    return trace.header_fields() if trace is not None else {}


def task_headers() -> dict[str, str]:
    """Headers for a task deferred now: ``traceparent`` inside a request, else none."""
    trace = _current.get()
    return {"traceparent": trace.traceparent} if trace is not None else {}


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class TraceMiddleware:
    """WSGI middleware: each request is :func:`current` while the app handles it."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        with request_scope(from_environ(environ)):
            return self.app(environ, start_response)


# -- logs ----------------------------------------------------------------------------------


class TraceLogFilter(logging.Filter):
    """Puts the current request's trace on every log record (``trace``, ``span_id``,
    ``trace_sampled``: the names google-cloud-logging's handlers read) and a short
    ``trace_suffix`` for plain-text formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace = _current.get()
        if trace is None:
            record.trace_suffix = ""
            return True
        project = settings().project
        record.trace = f"projects/{project}/traces/{trace.trace_id}" if project else trace.trace_id
        record.span_id = trace.span_id
        record.trace_sampled = trace.sampled
        record.trace_suffix = f" [trace {trace.trace_id[:8]}]"
        return True


def configure_logging(level: int = logging.INFO) -> logging.Handler:
    """Send the root logger's records to one handler that knows the current trace.

    On App Engine (``GAE_ENV`` set): google-cloud-logging's ``StructuredLogHandler``, JSON
    lines on stdout that Cloud Logging reads, with ``logging.googleapis.com/trace`` set, so a
    task's logs sit under the request that deferred it. Elsewhere: plain readable lines.
    Replaces handlers an earlier call installed; returns the handler.
    """
    handler: logging.Handler
    if os.environ.get("GAE_ENV"):
        from google.cloud.logging_v2.handlers import StructuredLogHandler

        handler = StructuredLogHandler(project_id=settings().project)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s%(trace_suffix)s: %(message)s")
        )
    # First: StructuredLogHandler's own filter reads the fields this one sets.
    handler.filters.insert(0, TraceLogFilter())
    handler.set_name("gae_deferred")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "gae_deferred"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
