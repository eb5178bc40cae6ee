"""/_ah/deferred-admin: the dashboard's HTML pages, actions and JSON API (webapp2).

``base`` holds what every handler shares (request parsing, the auth and CSRF hooks, rendering,
the security headers); ``views/`` one module per resource of the URLs (overview, spillover,
failures, queues, tasks, metrics, jobs, audit, sweeper, api, static), each handler thin: parse,
call :mod:`gae_deferred.admin`, render; ``urls`` the one route table. Pages work without
JavaScript: confirmations are server-rendered forms, "expand" is ``<details>``, auto-refresh
is a meta refresh::

    app = deferred_middleware(webapp2.WSGIApplication(MY_ROUTES + deferred_routes()))
"""

from .urls import admin_routes

__all__ = ["admin_routes"]
