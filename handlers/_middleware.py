"""The WSGI wrapper an app puts around itself: request trace, ndb context, dashboard guard.

::

    import webapp2
    from gae_deferred.webapp2 import deferred_middleware, deferred_routes

    app = deferred_middleware(webapp2.WSGIApplication(MY_ROUTES + deferred_routes()))

For every request it

- answers a request line (method, target, version) over 4,094 bytes, gunicorn's default
  ``limit_request_line``, with 414 and the security headers, before anything else and without
  reading the body, and a header field over 8,190 bytes (gunicorn's default
  ``limit_request_field_size``) with 431 (:mod:`gae_deferred.webapp2.gunicorn_conf` lifts
  gunicorn's own limits, whose error pages have no security headers, so that these requests
  reach these checks);
- makes the request current for :mod:`gae_deferred.tracing`, so ``defer()`` records "deferred
  by <path>" and the request's trace, and the task request joins that trace;
- opens an ndb context (legacy App Engine code expects one in every request);
- under ``/_ah/deferred-admin`` and ``/_ah/queue/deferred``: answers a path that is not UTF-8
  with 400 and a method the route does not take (dashboard: other than GET/POST; task path:
  other than POST) with 405 before the app sees them (webapp2 itself answers an unknown method
  with a bare 501 and a non-UTF-8 path with a 500), and adds the security headers to every
  response, whatever produced it;
- anywhere else: answers a path that is not UTF-8 with 400 (webapp2 cannot route it: a 500).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gae_deferred import ndb_context, tracing

from . import _admin_guard as guard


class DeferredMiddleware:
    """See the module docstring; ``app`` is any WSGI application."""

    def __init__(self, app: tracing.WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if guard.request_line_length(environ) > guard.MAX_REQUEST_LINE:
            message = f"The request line is over {guard.MAX_REQUEST_LINE} bytes."
            return guard.refuse(environ, start_response, 414, message)
        if guard.longest_header_field(environ) > guard.MAX_HEADER_FIELD:
            message = f"A header field is over {guard.MAX_HEADER_FIELD} bytes."
            return guard.refuse(environ, start_response, 431, message)
        security = guard.headers_for(environ)
        if security is not None:
            check = guard.refusal if security is guard.SECURITY_HEADERS else guard.task_refusal
            refused = check(environ)
            if refused is not None:
                return guard.refuse(environ, start_response, *refused)
            start_response = guard.with_security_headers(start_response, security)
        elif guard.request_path(environ) is None:
            return guard.refuse(environ, start_response, 400, "The path is not valid UTF-8.")
        with tracing.request_scope(tracing.from_environ(environ)), ndb_context():
            return self.app(environ, start_response)


def deferred_middleware(app: tracing.WsgiApp) -> DeferredMiddleware:
    """Wrap a WSGI app (see the module docstring)."""
    return DeferredMiddleware(app)
