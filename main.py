"""The WSGI app App Engine (and `make run`) serves: ``gunicorn main:app``.

An existing webapp2 app adds ``deferred_routes()`` to its own routes instead of using this file.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
# Vendored code lives in lib/, as App Engine apps always did.
sys.path.insert(0, os.path.join(ROOT, "lib"))

import webapp2  # noqa: E402

import gae_deferred  # noqa: E402
from gae_deferred.queue_config import load_queue_yaml  # noqa: E402
from handlers import deferred_routes  # noqa: E402

if not gae_deferred.settings().queue_yaml:  # GAE_DEFERRED_QUEUE_YAML wins, e.g. in tests
    gae_deferred.configure(queue_yaml=os.path.join(ROOT, "queue.yaml"))
# A broken queue.yaml stops the app here, with file:line errors, not in the middle of a task.
load_queue_yaml(gae_deferred.settings().queue_yaml)


def _routes() -> list:
    routes = deferred_routes()
    if gae_deferred.settings().local_mode:
        from handlers.demo import demo_routes

        routes += demo_routes()
    return routes


app = webapp2.WSGIApplication(_routes())
