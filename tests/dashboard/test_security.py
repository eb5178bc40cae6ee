"""Security findings on the dashboard, each with the attack that worked before its fix.

Crafted record ids (action hijack), parameters smuggled in the query string, non-UTF-8 paths
and unknown methods, IAP key fetching, DNS rebinding in local mode, and the cron URL.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import FailureState, admin, audit, failures
from gae_deferred.webapp2 import _admin_auth, deferred_middleware, deferred_routes
from tests.dashboard.support import (
    LOOPBACK,
    P,
    csrf_token,
    iap_claims,
    iap_signer,
    make_failure,
    make_spilled,
    pause,
    queued_tasks,
    sample,
)

HOSTILE_IDS = [
    "../queues/reports/pause?y=",
    "../../queues/default/purge?confirm=yes&x=",
    "a/b",
    "%2e%2e%2fqueues",
    "~not-base64!",
    # The longest key name Datastore holds (1,500 bytes); longer ids are 404, unread
    # (tests/dashboard/test_key_limits.py).
    "é" * 750,
    "<script>alert(1)</script>",
    "..",
]

SECURITY = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def assert_security_headers(response: webtest.TestResponse, cache: str = "no-store") -> None:
    for header, value in SECURITY.items():
        assert response.headers.get(header) == value, (header, response.status)
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == cache


def queue_state(queue: str) -> str:
    return admin.get_queue(queue).state.name


# -- C1: crafted ids ----------------------------------------------------------------------


@pytest.mark.parametrize("record_id", HOSTILE_IDS)
def test_records_with_hostile_ids_are_viewed_dismissed_and_deleted_not_hijacked(
    app, ndb_stub, record_id
):
    record = make_failure("odd", record_id=record_id, queue="reports")
    listing = app.get(f"{P}/failures/list")
    encoded = admin.url_id(record_id)
    assert "/" not in encoded and not encoded.startswith(".")
    detail = listing.click(href=f"{P}/failures/{encoded}$")
    assert detail.status_int == 200 and record.message in detail.text
    dismiss = next(f for f in detail.forms.values() if f.action.endswith("/dismiss"))
    assert dismiss.action == f"{P}/failures/{encoded}/dismiss"
    dismiss.submit().follow()
    assert failures.get(record_id).state == FailureState.DISMISSED
    assert queue_state("reports") == "RUNNING" and queue_state("default") == "RUNNING"
    delete = next(f for f in app.get(detail.request.url).forms.values() if "delete" in f.action)
    delete.submit().forms[0].submit()
    assert failures.get(record_id) is None
    assert [(e.action, e.target) for e in audit.recent()[0]] == [
        ("delete", f"failure/{record_id}"[:500]),
        ("dismiss", f"failure/{record_id}"[:500]),
    ]


def test_a_record_id_gae_deferred_cannot_have_made_is_not_handed_to_a_new_task(app, ndb_stub):
    record = make_failure("odd", record_id="../queues/reports/pause?y=", queue="reports")
    pause("reports")
    detail = app.get(f"{P}/failures/{admin.url_id(record.id)}")
    retry = next(f for f in detail.forms.values() if f.action.endswith("/retrigger"))
    refused = retry.submit(expect_errors=True)
    assert refused.status_int == 409 and "not retried" in refused.text
    assert queued_tasks("reports") == []
    assert failures.get(record.id).state == FailureState.DEAD


def test_url_ids_round_trip_and_bad_encodings_are_404(app, ndb_stub):
    for record_id in [*HOSTILE_IDS, "f-" + "0" * 32, "é/ü", "plain_id.1"]:
        assert admin.id_from_url(admin.url_id(record_id)) == record_id
    for segment in ("~%00", "~!!", "~_w"):
        response = app.get(f"{P}/failures/{segment}", expect_errors=True)
        assert response.status_int == 404


def test_actions_read_confirm_and_action_from_the_body_only(app, ndb_stub):
    token = csrf_token(app)
    page = app.post(f"{P}/queues/default/purge?confirm=yes", {"csrf_token": token})
    assert page.status_int == 200 and "Purge queue default?" in page.text
    pause("default")
    gae_deferred.defer(sample, 1, _countdown=3600)
    app.post(f"{P}/queues/default/purge?confirm=yes", {"csrf_token": token})
    assert len(queued_tasks("default")) == 1
    record = make_failure("body-only")
    answer = app.post(
        f"{P}/failures/bulk?action=delete&ids={record.id}&confirm=yes",
        {"csrf_token": token},
        expect_errors=True,
    )
    assert answer.status_int == 400 and failures.get(record.id) is not None
    api = app.post_json(
        f"{P}/api/failures/bulk?action=delete&ids={record.id}",
        {"action": "dismiss", "ids": [record.id]},
        headers={"X-CSRF-Token": token},
    ).json
    assert api["done"] == [record.id] and failures.get(record.id).state == "dismissed"


# -- C2: malformed paths and unknown methods ------------------------------------------------


@pytest.mark.parametrize("wrapped", [True, False])
def test_non_utf8_paths_are_400_with_security_headers(ndb_stub, tasks_emulator, wrapped):
    gae_deferred.configure(local_mode=True)
    wsgi = webapp2.WSGIApplication(deferred_routes())
    client = webtest.TestApp(deferred_middleware(wsgi) if wrapped else wsgi, extra_environ=LOOPBACK)
    for path in (f"{P}/%ff", f"{P}/failures/%ff%fe", f"{P}/api/%c0%af"):
        response = client.get(path, expect_errors=True)
        assert response.status_int == 400, path
        assert_security_headers(response)
    assert client.get(f"{P}/api/%ff", expect_errors=True).json["status"] == 400


def test_unknown_methods_are_405_with_security_headers(app, ndb_stub):
    for method in ("PATCH", "PUT", "DELETE", "OPTIONS", "TRACE"):
        for path in (P, f"{P}/failures/list", f"{P}/api/spillover", f"{P}/static/admin.css"):
            response = app.request(path, method=method, expect_errors=True)
            assert response.status_int == 405, (method, path, response.status)
            assert_security_headers(response)
            assert response.headers["Allow"] == "GET, POST"


def test_every_dashboard_response_carries_the_headers(app, ndb_stub):
    for path in (P, f"{P}/metrics", f"{P}/nope", f"{P}/failures/f-0", f"{P}/api/failures/x"):
        assert_security_headers(app.get(path, expect_errors=True))
    assert_security_headers(app.post(f"{P}/sweep", expect_errors=True))
    static = app.get(f"{P}/static/admin.css")
    assert_security_headers(static, cache="public, max-age=300")


# -- C3: IAP keys are cached -----------------------------------------------------------------


class _CertsServer:
    """IAP's certificate endpoint on loopback: real HTTP, counting fetches."""

    def __init__(self, certs: dict[str, str], max_age: int = 300) -> None:
        self.certs, self.max_age, self.fetches, self.failing = certs, max_age, 0, False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                if outer.failing:
                    self.send_response(500)
                    self.end_headers()
                    return
                body = json.dumps(outer.certs).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", f"public, max-age={outer.max_age}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/iap/verify/public_key"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def iap(app, monkeypatch) -> Iterator[tuple[_CertsServer, object, object]]:
    signer, public_pem = iap_signer("key-1")
    server = _CertsServer({"key-1": public_pem})
    monkeypatch.setattr(_admin_auth, "IAP_CERTS_URL", server.url)
    audience = "/projects/123/apps/test-project"
    gae_deferred.configure(local_mode=False, iap_audience=audience)
    _admin_auth.reset_iap_keys()
    try:
        yield server, signer, audience
    finally:
        server.server.shutdown()
        _admin_auth.reset_iap_keys()


def _iap_token(signer, audience: str) -> str:
    from google.auth import jwt

    return jwt.encode(signer, iap_claims(audience, "ops@example.com")).decode()


def test_a_burst_of_iap_requests_fetches_the_keys_once(app, ndb_stub, iap):
    server, signer, audience = iap
    headers = {"x-goog-iap-jwt-assertion": _iap_token(signer, audience)}
    for _ in range(25):
        assert "ops@example.com" in app.get(P, headers=headers).text
    assert server.fetches == 1


def test_an_unknown_key_id_refetches_once(app, ndb_stub, iap):
    server, signer, audience = iap
    app.get(P, headers={"x-goog-iap-jwt-assertion": _iap_token(signer, audience)})
    rotated, rotated_pem = iap_signer("key-2")
    server.certs = {**server.certs, "key-2": rotated_pem}
    headers = {"x-goog-iap-jwt-assertion": _iap_token(rotated, audience)}
    assert "ops@example.com" in app.get(P, headers=headers).text
    assert server.fetches == 2
    stranger, _ = iap_signer("key-9")
    for _ in range(5):
        forged = {"x-goog-iap-jwt-assertion": _iap_token(stranger, audience)}
        assert app.get(P, headers=forged, expect_errors=True).status_int == 403
    assert server.fetches == 2  # at most one refetch for unknown key ids per 30 s


def test_keys_that_cannot_be_fetched_answer_503(app, ndb_stub, iap):
    server, signer, audience = iap
    server.failing = True
    headers = {"x-goog-iap-jwt-assertion": _iap_token(signer, audience)}
    page = app.get(P, headers=headers, expect_errors=True)
    assert page.status_int == 503 and "IAP" in page.text
    assert_security_headers(page)
    api = app.get(f"{P}/api/overview", headers=headers, expect_errors=True)
    assert api.status_int == 503 and "public keys" in api.json["error"]


# -- C4: local mode needs a loopback Host; the cron URL needs cron --------------------------


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("localhost", None, True),
        ("127.0.0.1:8080", None, True),
        ("[::1]:8080", "8080", True),
        ("127.0.0.1:8080", "8080", True),
        ("127.0.0.1:8081", "8080", False),
        ("localhost", "8080", False),
        ("evil.example", None, False),
        ("evil.example:8080", "8080", False),
        ("127.0.0.1.evil.example", None, False),
        ("", None, False),
    ],
)
def test_local_mode_answers_only_loopback_host_names(
    app, ndb_stub, monkeypatch, host, port, allowed
):
    if port:
        monkeypatch.setenv("GAE_DEFERRED_LOCAL_PORT", port)
    gae_deferred.reset_clients()
    gae_deferred.configure(local_mode=True, ndb_client=ndb_stub)
    response = app.get(P, extra_environ={"HTTP_HOST": host}, expect_errors=True)
    assert (response.status_int == 200) is allowed, response.status
    if not allowed:
        assert response.status_int == 403 and "Local mode answers only" in response.text


def test_cron_url_needs_app_engine_cron_or_the_token(app, ndb_stub, monkeypatch):
    stale = make_spilled("stale", state="dead")
    stale.updated = stale.updated.replace(year=stale.updated.year - 1)
    stale.put()
    for headers in ({}, {"X-Appengine-Cron": "true"}, {"X-Deferred-Cron-Token": "guess"}):
        response = app.get(f"{P}/cron/sweep", headers=headers, expect_errors=True)
        assert response.status_int == 403, headers  # loopback admin in local mode: still no
        assert_security_headers(response)
    assert admin.get_spillover("stale") is not None
    monkeypatch.setenv("GAE_DEFERRED_CRON_TOKEN", "t0ken-of-this-run")
    gae_deferred.reset_clients()
    gae_deferred.configure(local_mode=True, ndb_client=ndb_stub)
    wrong = app.get(
        f"{P}/cron/sweep", headers={"X-Deferred-Cron-Token": "t0ken"}, expect_errors=True
    )
    assert wrong.status_int == 403
    report = app.get(f"{P}/cron/sweep", headers={"X-Deferred-Cron-Token": "t0ken-of-this-run"})
    assert report.json["report"]["purged_payloads"] == 1


def test_a_flash_naming_the_longest_id_fits_a_browsers_cookie_and_is_shown(app, ndb_stub):
    """The flash after dismissing a record with a 1,500-byte id names it in its text and links:
    sealed whole it would be a 15 KB cookie, which browsers drop (4 KB each) and gunicorn
    refuses (a header field over 8,190 bytes). It gives up links, then text, to fit."""
    record_id = "é" * 750
    make_failure("odd", record_id=record_id, queue="reports")
    detail = app.get(f"{P}/failures/{admin.url_id(record_id)}")
    dismiss = next(f for f in detail.forms.values() if f.action.endswith("/dismiss"))
    answer = dismiss.submit()
    (cookie,) = [v for k, v in answer.headerlist if k == "Set-Cookie" and "flash" in v]
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    assert len("deferred_admin_flash=" + value) <= 4096
    page = answer.follow()
    assert page.status_int == 200
    assert "Dismissed" in page.text or "dismissed" in page.text
