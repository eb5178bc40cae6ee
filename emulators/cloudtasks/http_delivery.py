"""HTTP-target tasks (``Task.http_request``): what CreateTask checks and how they are delivered.

As Cloud Tasks does: the task goes to its own absolute URL, with ``X-CloudTasks-*`` task
headers (never App Engine's) and, when the task has an ``oidc_token``, an
``Authorization: Bearer`` ID token for its service account and audience (the URL when the
audience is empty), signed by the emulator's :class:`~.oidc.OidcIssuer`.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from google.cloud import tasks_v2

from . import dispatch
from .oidc import OidcIssuer

#: Cloud Tasks' limit for an HTTP-target task (App Engine tasks: 100 KB).
MAX_HTTP_TASK_BYTES = 1024 * 1024
USER_AGENT = "Google-Cloud-Tasks"
_FORBIDDEN_HEADER = re.compile(
    r"^(host|authorization|x-google-.*|x-appengine-.*|x-cloudtasks-.*)$", re.IGNORECASE
)


def _method(number: int) -> str:
    """The HTTP method of an HttpMethod value (unspecified: POST, as Cloud Tasks does)."""
    try:
        name = tasks_v2.HttpMethod(number).name
    except ValueError:
        raise ValueError(f"unknown http_method {number}") from None
    return "POST" if name == "HTTP_METHOD_UNSPECIFIED" else name


def check(request: Any, issuer: OidcIssuer | None) -> None:
    """Validate (and normalise) a task's ``http_request`` in place; raises ValueError."""
    parts = urllib.parse.urlsplit(request.url)
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in request.url:
        raise ValueError(f"invalid http_request.url {request.url[:100]!r}: an absolute http(s) URL")
    if request.body and _method(request.http_method) not in ("POST", "PUT", "PATCH"):
        raise ValueError("a body is allowed only for POST, PUT and PATCH tasks")
    if request.HasField("oauth_token"):
        raise ValueError("oauth_token is for Google APIs; this emulator signs oidc_token only")
    if request.HasField("oidc_token"):
        if issuer is None:
            raise ValueError(
                "this emulator signs no OIDC tokens: start it with --oidc-port "
                "(gae-deferred-dev --http-target)"
            )
        if "@" not in request.oidc_token.service_account_email:
            raise ValueError("oidc_token.service_account_email must be an email")
    for key in [key for key in request.headers if _FORBIDDEN_HEADER.match(key)]:
        del request.headers[key]
    size = len(request.body) + len(request.url.encode())
    size += sum(len(k.encode()) + len(v.encode()) for k, v in request.headers.items())
    if size > MAX_HTTP_TASK_BYTES:
        raise ValueError(
            f"Task size too large: {size} bytes exceeds the maximum of {MAX_HTTP_TASK_BYTES} bytes"
        )


def delivery(
    pb: Any, queue: str, task: Any, issuer: OidcIssuer | None
) -> tuple[str, str, str, dict[str, str], bytes]:
    """(base URL, method, path with query, headers, body) of one attempt of the task ``pb``
    (``task``: the emulator's record, with ``failures``, ``scheduled``, ``previous_status``
    and ``retry_reason``)."""
    request = pb.http_request
    parts = urllib.parse.urlsplit(request.url)
    base = f"{parts.scheme}://{parts.netloc}"
    uri = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {k: v for k, v in request.headers.items() if k.lower() != "user-agent"}
    headers["User-Agent"] = USER_AGENT
    if request.body and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/octet-stream"
    headers.update(dispatch.task_headers("X-CloudTasks-", queue, task))
    if request.HasField("oidc_token") and issuer is not None:
        oidc = request.oidc_token
        token = issuer.sign(oidc.service_account_email, oidc.audience or request.url)
        headers["Authorization"] = f"Bearer {token}"
    return base, _method(request.http_method), uri, headers, bytes(request.body)
