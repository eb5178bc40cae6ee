"""The WSGI app App Engine (and `make run`) serves: ``gunicorn main:app``.

An existing webapp2 app adds ``deferred_routes()`` to its own routes instead of using this file,
and wraps itself in ``deferred_middleware`` as below.
"""

from __future__ import annotations

import os

import webapp2

import gae_deferred
from gae_deferred import tracing
from gae_deferred.queue_config import load_queue_yaml
from gae_deferred.webapp2 import deferred_middleware, deferred_routes

ROOT = os.path.dirname(os.path.abspath(__file__))

if not gae_deferred.settings().queue_yaml:  # GAE_DEFERRED_QUEUE_YAML wins, e.g. in tests
    gae_deferred.configure(queue_yaml=os.path.join(ROOT, "queue.yaml"))
# A broken queue.yaml stops the app here, with file:line errors, not in the middle of a task.
load_queue_yaml(gae_deferred.settings().queue_yaml)


def _routes() -> list:
    routes = deferred_routes()
    if gae_deferred.settings().local_mode:
        from demo import demo_routes

        routes += demo_routes()
    return routes


# Logs with the trace of the request (or task) they belong to: JSON on App Engine.
tracing.configure_logging()
app = deferred_middleware(webapp2.WSGIApplication(_routes()))
