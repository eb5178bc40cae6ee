"""The framework floor: a bare webapp2 handler that only unpickles the body and calls it.

Shared by the handler benchmark in this interpreter and the legacy comparison in
``.venv-bench-legacy`` (which has webapp2 at the same pin), so both compare to the same code::

    app = floor_app()
    status = call_wsgi(app, environ_factory())
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterable

import webapp2
import webob

TASK_URL = "/_ah/queue/deferred"
#: What Cloud Tasks sends with an App Engine task (the handler benchmark's request).
TASK_HEADERS = {
    "Content-Type": "application/octet-stream",
    "X-AppEngine-QueueName": "default",
    "X-AppEngine-TaskName": "bench-task-1",
    "X-AppEngine-TaskRetryCount": "0",
    "X-AppEngine-TaskExecutionCount": "0",
    "X-AppEngine-TaskETA": "1700000000.000000",
    "User-Agent": "AppEngine-Google; (+http://code.google.com/appengine)",
}


class FloorHandler(webapp2.RequestHandler):
    """What any task handler must at least do: read the body, unpickle, call."""

    def post(self) -> None:
        obj, args, kwargs = pickle.loads(self.request.body)
        obj(*args, **kwargs)
        self.response.content_type = "text/plain"
        self.response.write("ok\n")


class InputFloorHandler(webapp2.RequestHandler):
    """The same, reading the body straight from ``wsgi.input`` as our handler does (webob's
    ``request.body`` spools it to a temporary file first)."""

    def post(self) -> None:
        environ = self.request.environ
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        obj, args, kwargs = pickle.loads(body)
        obj(*args, **kwargs)
        self.response.content_type = "text/plain"
        self.response.write("ok\n")


def input_floor_app() -> webapp2.WSGIApplication:
    """A webapp2 app with only the wsgi.input floor handler, on the task route."""
    return webapp2.WSGIApplication([webapp2.Route(TASK_URL, InputFloorHandler, methods=["POST"])])


def floor_app() -> webapp2.WSGIApplication:
    """A webapp2 app with only the floor handler, on the task route."""
    return webapp2.WSGIApplication([webapp2.Route(TASK_URL, FloorHandler, methods=["POST"])])


def environ_factory(body: bytes, **extra: str) -> Callable[[], dict]:
    """A function returning a fresh WSGI environ for a task POST of ``body`` (a new input stream
    each time, everything else copied from one template so the copy costs ~1 us)."""
    template = webob.Request.blank(TASK_URL, method="POST", headers=TASK_HEADERS).environ
    template.update(extra)
    template["CONTENT_LENGTH"] = str(len(body))
    template.pop("wsgi.input", None)

    def make() -> dict:
        environ = dict(template)
        environ["wsgi.input"] = io.BytesIO(body)
        return environ

    return make


def _start_response(status: str, headers: list, exc_info: object = None) -> None:
    _start_response.status = status  # type: ignore[attr-defined]


def call_wsgi(app: Callable[[dict, Callable], Iterable[bytes]], environ: dict) -> str:
    """Call a WSGI app the way a server does (consume and close the body); return the status."""
    result = app(environ, _start_response)
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return _start_response.status  # type: ignore[attr-defined]
