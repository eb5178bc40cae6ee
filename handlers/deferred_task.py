"""POST /_ah/queue/deferred[/<dotted.function>]: runs deferred tasks.

The handler only parses the request; gae_deferred.execute_task decides everything else and
returns the status from docs/design.md's table (403 forged, replayed or not from the queue, 200
done or failed for good, 408 SingularTaskFailure, 500 or 503 retry).

It checks the task headers before reading any of the body, and reads at most MAX_BODY_BYTES
straight from ``wsgi.input``: a request without task headers costs nothing, a large or
chunked body is refused with 413 after at most the cap, and WebOb never copies the body.
"""

from __future__ import annotations

import webapp2

from gae_deferred import TaskInfo, defaults, execute_task, http_target, refusals, tracing

from ._admin_guard import TASK_SECURITY_HEADERS

#: Cloud Tasks caps App Engine tasks at 100 KB (HTTP targets at 1 MB); anything bigger is forged.
MAX_BODY_BYTES = 1024 * 1024
#: Sent with every answer, errors included: the body is plain text and never framed.
SECURITY_HEADERS = tuple(TASK_SECURITY_HEADERS.items())

_HEADERS = (("Content-Type", "text/plain; charset=utf-8"), *SECURITY_HEADERS)


class _TooLarge(Exception):
    """The body is larger than MAX_BODY_BYTES."""


class _Short(Exception):
    """The body ended before its Content-Length."""


def read_body(environ: dict, cap: int = MAX_BODY_BYTES) -> bytes:
    """At most ``cap`` bytes of the request body, straight from ``wsgi.input``.

    With a Content-Length over the cap nothing is read; without one (chunked) at most cap + 1
    bytes are read. Raises _TooLarge or _Short.
    """
    stream = environ["wsgi.input"]
    declared = environ.get("CONTENT_LENGTH")
    if declared:
        try:
            length = int(declared)
        except ValueError:
            raise _Short(f"Content-Length {declared[:20]!r} is not a number") from None
        if length > cap:
            raise _TooLarge(f"body of {length} bytes is larger than any task")
        body = stream.read(length) if length else b""
        # A server may hand back less than asked per read(); keep reading until EOF.
        while len(body) < length:
            more = stream.read(length - len(body))
            if not more:
                raise _Short(f"body ended after {len(body)} of {length} bytes")
            body += more
        return body
    body = stream.read(cap + 1)
    if len(body) > cap:
        raise _TooLarge(f"body is larger than any task ({cap} bytes)")
    return body


class DeferredTaskHandler(webapp2.RequestHandler):
    """Executes one task; the optional path suffix only names the function for the logs.

    Legacy apps routed to (or subclassed) ``deferred.TaskHandler``; this is that class.
    """

    def dispatch(self) -> None:
        # The whole header list in one assignment: webob's header setter scans the list on
        # every call, and these were a fifth of the handler's own CPU per task.
        self.response.headerlist[:] = _HEADERS
        if self.request.method != "POST":
            self.response.headers["Allow"] = "POST"
            self._answer(405, f"{self.request.method} is not allowed; tasks are POSTed")
            return
        super().dispatch()

    def post(self, function: str | None = None) -> None:
        environ = self.request.environ
        try:
            task = TaskInfo.from_environ(environ)
        except http_target.Unproven as exc:
            # An HTTP target's OIDC token is missing or bad: nothing of the body is read.
            outcome = http_target.outcome_for(exc)
            self._answer(outcome.status, outcome.result)
            return
        if task is None:
            # No task headers: nothing of the body is read.
            refusals.record("not-from-queue", None, "no task queue headers")
            self._answer(403, "forbidden")
            return
        try:
            body = read_body(environ)
        except _TooLarge as exc:
            self._answer(413, str(exc))
            return
        except _Short as exc:
            self._answer(400, str(exc))
            return
        # The task request joins the trace of the request that deferred it (traceparent), so
        # what the task defers in turn records it too, with or without deferred_middleware.
        with tracing.request_scope(tracing.from_environ(environ)):
            outcome = execute_task(body, task)
        self._answer(outcome.status, outcome.result)

    def _answer(self, status: int, text: str) -> None:
        response = self.response
        response.status_int = status
        # Bytes straight into the body (Content-Type is in _HEADERS): Response.write and the
        # content_type setter re-derive the charset on every call.
        response.body = (text + "\n").encode()


def task_routes() -> list[webapp2.Route]:
    """The task URL, bare and with a function name appended (any method: the handler answers
    405 itself, with its headers, instead of webapp2's bare error page)."""
    return [
        webapp2.Route(defaults.TASK_URL, DeferredTaskHandler),
        webapp2.Route(defaults.TASK_URL + "/<function:[^/]+>", DeferredTaskHandler),
    ]
