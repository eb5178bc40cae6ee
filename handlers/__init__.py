"""webapp2 routes for gae_deferred, to add to an existing app::

import webapp2
from handlers import deferred_routes

app = webapp2.WSGIApplication(MY_ROUTES + deferred_routes())
"""

from __future__ import annotations

import webapp2

from .deferred_admin import admin_routes
from .deferred_task import task_routes


def deferred_routes() -> list[webapp2.Route]:
    """The task endpoint and the admin dashboard, as a list of routes."""
    return task_routes() + admin_routes()
