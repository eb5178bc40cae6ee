"""gae_deferred.webapp2: the task handler and the admin dashboard as webapp2 routes.

Add them to an existing app::

    import webapp2
    from gae_deferred.webapp2 import deferred_middleware, deferred_routes

    app = deferred_middleware(webapp2.WSGIApplication(MY_ROUTES + deferred_routes()))

``deferred_middleware`` makes the request current for ``defer()`` (tasks remember which request
deferred them and join its trace), opens an ndb context per request, and guards the dashboard's
prefix before webapp2 routes (see ``_middleware``). ``configure_logging()`` (from
:mod:`gae_deferred.tracing`, here for the same import line) makes task logs on App Engine join
the trace of the request that deferred them.

Run gunicorn with ``-c python:gae_deferred.webapp2.gunicorn_conf`` (see ``gunicorn_conf``), so
that a request line over 4,094 bytes gets the middleware's 414 with the security headers
rather than gunicorn's own bare page.

In this repository the package is the ``handlers/`` folder; the wheel installs it as
``gae_deferred.webapp2``, with the dashboard's templates and static files as package data.

``TaskHandler`` is the legacy ``deferred.TaskHandler`` for apps that subclass it (see legacy.py).
"""

from __future__ import annotations

import webapp2

from gae_deferred.tracing import configure_logging

from ._middleware import deferred_middleware
from .admin import admin_routes
from .deferred_task import DeferredTaskHandler, task_routes
from .legacy import TaskHandler

__all__ = [
    "DeferredTaskHandler",
    "TaskHandler",
    "admin_routes",
    "configure_logging",
    "deferred_middleware",
    "deferred_routes",
    "task_routes",
]


def deferred_routes() -> list[webapp2.Route]:
    """The admin dashboard and the task endpoint, as a list of routes.

    The dashboard comes first: its one route matches the raw path, so a path that is not UTF-8
    under /_ah/deferred-admin gets the dashboard's 400 instead of failing in a later route, and
    costs a task request a single prefix check.
    """
    return admin_routes() + task_routes()
