"""What every answer under gae_deferred's paths carries, and the requests refused before any
handler runs.

Shared by the dashboard's routes and :func:`gae_deferred.webapp2.deferred_middleware`, which
also catches what webapp2 answers before routing (a method it does not know: a bare 501; a path
that is not UTF-8: a 500) and adds the headers to whatever answers under the dashboard's prefix
and the task path (webapp2's own 404 included)::

    headers = guard.headers_for(environ)       # the headers every answer carries, or None
    refusal = guard.refusal(environ)           # (status, message) or None (dashboard)
    path = guard.request_path(environ)         # None when the path is not UTF-8
    too_long = guard.request_line_length(environ) > guard.MAX_REQUEST_LINE
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from gae_deferred import defaults

PREFIX = defaults.ADMIN_PREFIX
ALLOWED_METHODS = ("GET", "POST")
#: The task handler's path (bare, or with a function name after it).
TASK_PATH = defaults.TASK_URL
#: gunicorn's default limit_request_line: the longest request line (method, target, version)
#: answered by the app; the middleware answers longer ones with 414 itself, because
#: gunicorn_conf lifts gunicorn's own limit (whose 414 page has no security headers).
MAX_REQUEST_LINE = 4094
#: gunicorn's default ``limit_request_field_size``: a header line ("Name: value" and CRLF).
MAX_HEADER_FIELD = 8190

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: The task handler's (its answers are plain text, never framed, never cached).
TASK_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def raw_path(environ: dict[str, Any]) -> str:
    """SCRIPT_NAME + PATH_INFO as the server gave them (PEP 3333: bytes held as latin-1)."""
    return (environ.get("SCRIPT_NAME") or "") + (environ.get("PATH_INFO") or "")


def request_path(environ: dict[str, Any]) -> str | None:
    """The decoded request path, or None when its bytes are not UTF-8."""
    try:
        return raw_path(environ).encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return None


def request_line_length(environ: dict[str, Any]) -> int:
    """The bytes of the request line ``METHOD SP target SP version`` as gunicorn measures it.

    The target is gunicorn's RAW_URI (or REQUEST_URI) as sent; under other servers it is
    rebuilt from the percent-encoded path and the query string.
    """
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not target:
        raw = raw_path(environ).encode("latin-1", "replace")
        path = urllib.parse.quote(raw, safe="/;=,~!$&'()*+@:")
        query = environ.get("QUERY_STRING") or ""
        target = f"{path}?{query}" if query else path
    method = environ.get("REQUEST_METHOD") or ""
    version = environ.get("SERVER_PROTOCOL") or "HTTP/1.1"
    return len(f"{method} {target} {version}".encode("latin-1", "replace"))


def longest_header_field(environ: dict[str, Any]) -> int:
    """The bytes of the longest header line ``Name: value`` CRLF, as gunicorn measures one
    (repeated fields arrive joined by commas, and count as one line)."""
    longest = 0
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = key
        else:
            continue
        if isinstance(value, str):
            longest = max(longest, len(name) + 2 + len(value.encode("latin-1", "replace")) + 2)
    return longest


def is_dashboard(environ: dict[str, Any]) -> bool:
    path = raw_path(environ)
    return path == PREFIX or path.startswith(PREFIX + "/")


def is_task_path(environ: dict[str, Any]) -> bool:
    path = raw_path(environ)
    return path == TASK_PATH or path.startswith(TASK_PATH + "/")


def headers_for(environ: dict[str, Any]) -> dict[str, str] | None:
    """The security headers every answer to this request carries: the dashboard's, the task
    handler's, or None for the app's own paths."""
    if is_dashboard(environ):
        return SECURITY_HEADERS
    if is_task_path(environ):
        return TASK_SECURITY_HEADERS
    return None


def task_refusal(environ: dict[str, Any]) -> tuple[int, str] | None:
    """Why a request to the task path is refused before webapp2 routes it, or None."""
    if request_path(environ) is None:
        return 400, "The path is not valid UTF-8."
    method = environ.get("REQUEST_METHOD")
    if method != "POST":
        return 405, f"{method} is not allowed; tasks are POSTed"
    return None


def refusal(environ: dict[str, Any]) -> tuple[int, str] | None:
    """Why a dashboard request is refused before authentication, or None."""
    if request_path(environ) is None:
        return 400, "The path is not valid UTF-8."
    if environ.get("REQUEST_METHOD") not in ALLOWED_METHODS:
        return 405, f"{environ.get('REQUEST_METHOD')} is not allowed here (GET or POST)."
    return None


def refuse(
    environ: dict[str, Any], start_response: Callable[..., Any], status: int, message: str
) -> Iterable[bytes]:
    """A minimal error answer with the security headers (no page: nobody is authenticated)."""
    task_path = is_task_path(environ)
    if raw_path(environ).startswith(PREFIX + "/api/"):
        body = json.dumps({"error": message, "status": status}).encode()
        content_type = "application/json; charset=utf-8"
    elif task_path:
        body = f"{message}\n".encode()
        content_type = "text/plain; charset=utf-8"
    else:
        body = f"Error {status}: {message}\n".encode()
        content_type = "text/plain; charset=utf-8"
    security = TASK_SECURITY_HEADERS if task_path else SECURITY_HEADERS
    headers = [*security.items(), ("Content-Type", content_type)]
    if status == 405:
        headers.append(("Allow", "POST" if task_path else ", ".join(ALLOWED_METHODS)))
    reason = {
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        414: "URI Too Long",
        431: "Request Header Fields Too Large",
    }.get(status, "Error")
    start_response(f"{status} {reason}", [*headers, ("Content-Length", str(len(body)))])
    return [body]


def with_security_headers(
    start_response: Callable[..., Any], security: dict[str, str] = SECURITY_HEADERS
) -> Callable[..., Any]:
    """start_response that adds every security header the response does not set itself."""

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        present = {name.lower() for name, _ in headers}
        extra = [(k, v) for k, v in security.items() if k.lower() not in present]
        return start_response(status, [*headers, *extra], exc_info)

    return start
