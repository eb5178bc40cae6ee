"""The dashboard app the tests in this folder drive (see support.py for their helpers)."""

from __future__ import annotations

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import admin, metrics
from gae_deferred.webapp2 import _admin_auth, deferred_middleware, deferred_routes
from tests.dashboard.support import LOOPBACK


@pytest.fixture
def app(ndb_stub, fresh_tasks_emulator):
    """The dashboard in local mode, requests from loopback (so: admin), behind the middleware
    an app wraps itself in."""
    gae_deferred.configure(local_mode=True)
    _admin_auth.reset_iap_keys()
    metrics.discard_pending()
    admin.forget_status()
    wsgi = deferred_middleware(webapp2.WSGIApplication(deferred_routes()))
    return webtest.TestApp(wsgi, extra_environ=LOOPBACK)
