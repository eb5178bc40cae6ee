"""gae_deferred.webapp2: the task handler and the admin dashboard as webapp2 routes.

Add them to an existing app::

    import webapp2
    from gae_deferred.webapp2 import deferred_routes

    app = webapp2.WSGIApplication(MY_ROUTES + deferred_routes())

In this repository the package is the ``handlers/`` folder; the wheel installs it as
``gae_deferred.webapp2``, with the dashboard's templates and static files as package data.

``TaskHandler`` is the legacy ``deferred.TaskHandler`` for apps that subclass it (see legacy.py).
"""

from __future__ import annotations

import webapp2

from .deferred_admin import admin_routes
from .deferred_task import DeferredTaskHandler, task_routes
from .legacy import TaskHandler

__all__ = ["DeferredTaskHandler", "TaskHandler", "admin_routes", "deferred_routes", "task_routes"]


def deferred_routes() -> list[webapp2.Route]:
    """The task endpoint and the admin dashboard, as a list of routes."""
    return task_routes() + admin_routes()
