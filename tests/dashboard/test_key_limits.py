"""Ids Datastore cannot hold answer 404 on every dashboard endpoint that takes an id, before
any RPC: on Google's Firestore emulator (Datastore mode), as in production, even a Lookup of a
key name over 1,500 bytes fails with INVALID_ARGUMENT (a 500, before the fix)."""

from __future__ import annotations

import pytest
import webapp2
import webtest
from google.cloud import ndb

import gae_deferred
from gae_deferred import admin, metrics
from gae_deferred.webapp2 import _admin_auth, deferred_middleware, deferred_routes
from tests.dashboard.support import LOOPBACK, ROOT, P, csrf_token

TOO_LONG = ["x" * 1_501, "é" * 751, "~" + "A" * 3000]
READS = ["/spillover/{}", "/failures/{}", "/api/spillover/{}", "/api/failures/{}"]
WRITES = [
    "/spillover/{}/retrigger",
    "/spillover/{}/delete",
    "/failures/{}/retrigger",
    "/failures/{}/dismiss",
    "/failures/{}/delete",
    "/api/spillover/{}/retrigger",
    "/api/spillover/{}/delete",
    "/api/failures/{}/retrigger",
    "/api/failures/{}/dismiss",
    "/api/failures/{}/delete",
]


@pytest.fixture
def google_app(firestore_emulator, fresh_tasks_emulator, monkeypatch):
    """The dashboard in local mode with Datastore on Google's Firestore emulator."""
    firestore_emulator.reset()
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", firestore_emulator.address)
    gae_deferred.configure(
        ndb_client=ndb.Client(project="test-project"),
        local_mode=True,
        queue_yaml=str(ROOT / "queue.yaml"),
    )
    _admin_auth.reset_iap_keys()
    metrics.discard_pending()
    wsgi = deferred_middleware(webapp2.WSGIApplication(deferred_routes()))
    return webtest.TestApp(wsgi, extra_environ=LOOPBACK)


def _segment(record_id: str) -> str:
    return record_id if record_id.startswith("~") else admin.url_id(record_id)


@pytest.mark.parametrize("record_id", TOO_LONG)
def test_ids_over_datastores_limit_are_404_everywhere(google_app, record_id):
    token = csrf_token(google_app)
    segment = _segment(record_id)
    for path in READS:
        response = google_app.get(P + path.format(segment), expect_errors=True)
        assert response.status_int == 404, (path, response.status)
    for path in WRITES:
        response = google_app.post(
            P + path.format(segment),
            {"csrf_token": token, "confirm": "yes"},
            headers={"X-CSRF-Token": token},
            expect_errors=True,
        )
        assert response.status_int == 404, (path, response.status)


def test_an_id_at_the_limit_is_looked_up(google_app):
    """1,500 bytes is a key name Datastore takes: not found after a real Lookup."""
    segment = _segment("é" * 750)
    for path in READS:
        assert google_app.get(P + path.format(segment), expect_errors=True).status_int == 404


def test_long_ids_are_refused_before_any_rpc(ndb_stub):
    calls: list[str] = []
    for name in ("lookup", "commit"):
        wrapper = getattr(ndb_stub.stub, name)
        original = wrapper.func

        def recorded(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        wrapper.func = recorded
    for record_id in ("x" * 1_501, "é" * 751, "__reserved__"):
        with pytest.raises(gae_deferred.admin.NotFound):
            admin.get_spillover(record_id)
        with pytest.raises(gae_deferred.admin.NotFound):
            admin.get_failure(record_id)
        with pytest.raises(gae_deferred.admin.NotFound):
            admin.delete_failure(record_id, "tester")
    assert calls == []
