"""The ceiling of the throughput benchmark: gunicorn serving a WSGI app that does nothing.

``gunicorn benchmarks.noop_wsgi:app`` with the stack's worker settings answers each POST with
200 after reading the body: any task handler's rate on that server is below this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """Read the body (as a task handler must) and answer 200."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    environ["wsgi.input"].read(length)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
