"""Roles: viewers see every page and no action button, and every POST of theirs is refused
(403) and audited; admins see and use the buttons. Hooks, IAP email lists and local mode."""

from __future__ import annotations

import pytest

import gae_deferred
from gae_deferred import FailureState, audit, failures, spillover
from gae_deferred.webapp2 import _admin_auth
from tests.dashboard.support import P, csrf_token, make_failure, make_spilled

NOT_LOCAL = {"REMOTE_ADDR": "203.0.113.9"}


def _as(role: str) -> dict[str, str]:
    return {**NOT_LOCAL, "HTTP_X_WHO": role}


@pytest.fixture
def roles(app):
    gae_deferred.configure(
        local_mode=False,
        admin_hook=lambda environ: (
            "boss@example.com" if environ.get("HTTP_X_WHO") == "admin" else None
        ),
        viewer_hook=lambda environ: (
            "intern@example.com" if environ.get("HTTP_X_WHO") == "viewer" else None
        ),
    )
    make_failure("t-role", state=FailureState.DEAD)
    make_spilled("role1")
    return app


def _pages(failure_id: str) -> list[str]:
    return [
        "",
        "/metrics",
        "/spillover",
        "/spillover/role1",
        "/failures",
        "/failures/list",
        f"/failures/{failure_id}",
        "/queues",
        "/queues/default",
        "/audit",
    ]


ACTIONS = [
    ("/sweep", {}),
    ("/spillover/role1/retrigger", {}),
    ("/spillover/role1/delete", {"confirm": "yes"}),
    ("/spillover/bulk", {"action": "delete", "ids": "role1", "confirm": "yes"}),
    ("/spillover/bulk-matching", {"action": "delete", "state": "pending", "confirm": "yes"}),
    ("/failures/bulk", {"action": "delete", "ids": "{failure}", "confirm": "yes"}),
    ("/failures/bulk-matching", {"action": "delete", "confirm": "yes"}),
    ("/failures/retry-group", {"group": "test_admin.sample|ValueError", "confirm": "yes"}),
    ("/failures/{failure}/retrigger", {}),
    ("/failures/{failure}/dismiss", {}),
    ("/failures/{failure}/delete", {"confirm": "yes"}),
    ("/queues/default/pause", {}),
    ("/queues/default/resume", {}),
    ("/queues/default/purge", {"confirm": "yes"}),
    ("/queues/default/tasks/t-x/run", {}),
    ("/queues/default/tasks/t-x/delete", {"confirm": "yes"}),
]


def test_viewers_see_every_page_without_a_single_action_button(roles):
    failure_id = failures.DeferredFailure.query().get().id
    for path in _pages(failure_id):
        page = roles.get(P + path, extra_environ=_as("viewer"))
        assert page.status_int == 200, path
        assert 'method="post"' not in page.text, path
        assert ">viewer</span>" in page.text
    assert roles.get(P + "/api/overview", extra_environ=_as("viewer")).status_int == 200


def test_every_post_of_a_viewer_is_refused_and_audited(roles):
    failure_id = failures.DeferredFailure.query().get().id
    token = roles.get(f"{P}/api/csrf", extra_environ=_as("viewer")).json["csrf_token"]
    for api in ("", "/api"):
        for path, fields in ACTIONS:
            url = P + api + path.replace("{failure}", failure_id)
            body = {k: v.replace("{failure}", failure_id) for k, v in fields.items()}
            answer = roles.post(
                url, {**body, "csrf_token": token}, extra_environ=_as("viewer"), expect_errors=True
            )
            assert answer.status_int == 403, url
            assert "Viewers may look but not act" in answer.text
    assert failures.get(failure_id).state == FailureState.DEAD
    assert spillover.get("role1") is not None
    refused = [e for e in audit.recent(100, None)[0] if e.action == "refused"]
    assert len(refused) == 2 * len(ACTIONS)
    assert {e.actor for e in refused} == {"intern@example.com"}


def test_admins_see_the_buttons_and_act(roles):
    failure_id = failures.DeferredFailure.query().get().id
    page = roles.get(f"{P}/failures/{failure_id}", extra_environ=_as("admin"))
    assert "Retry now" in page.text and ">viewer</span>" not in page.text
    token = roles.get(f"{P}/api/csrf", extra_environ=_as("admin")).json["csrf_token"]
    done = roles.post(
        f"{P}/api/failures/{failure_id}/dismiss", {"csrf_token": token}, extra_environ=_as("admin")
    )
    assert done.json["ok"] is True
    assert failures.get(failure_id).state == FailureState.DISMISSED
    assert roles.get(P, extra_environ=NOT_LOCAL, expect_errors=True).status_int == 403


def test_iap_email_lists_from_the_environment(monkeypatch):
    import gae_deferred._config as config

    assert _admin_auth.iap_role("anyone@example.com") == "admin"  # no lists: as before
    monkeypatch.setenv("GAE_DEFERRED_ADMIN_EMAILS", "Boss@Example.com, @ops.example.com")
    monkeypatch.setenv("GAE_DEFERRED_VIEWER_EMAILS", "@example.com")
    config.reset()
    assert _admin_auth.iap_role("boss@example.com") == "admin"
    assert _admin_auth.iap_role("pager@ops.example.com") == "admin"
    assert _admin_auth.iap_role("intern@example.com") == "viewer"
    assert _admin_auth.iap_role("someone@elsewhere.org") is None
    monkeypatch.setenv("GAE_DEFERRED_VIEWER_EMAILS", "*")
    config.reset()
    assert _admin_auth.iap_role("someone@elsewhere.org") == "viewer"


def test_local_mode_can_preview_the_viewer_role_but_never_gain_one(app):
    viewer = app.get(P, headers={"X-Deferred-Role": "viewer"})
    assert ">viewer</span>" in viewer.text and "Run sweeper" not in viewer.text
    token = csrf_token(app)
    refused = app.post(
        f"{P}/api/sweep",
        {"csrf_token": token},
        headers={"X-Deferred-Role": "viewer"},
        expect_errors=True,
    )
    assert refused.status_int == 403
    assert "Run sweeper" in app.get(P, headers={"X-Deferred-Role": "admin"}).text
