"""Refused deliveries on the dashboard (a card, a page, its JSON twin), and a version-skew
failure retried on the version that made it."""

from __future__ import annotations

import gae_deferred
from gae_deferred import envelope, failures, refusals
from tests.dashboard.support import P, form_token, pause, queued_tasks
from tests.fixtures import BODIES

TASK = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "t-refused"}
SECRET_ARGUMENT = "never-shown-" * 3


def secret_work(value):
    """The deferred function of a body the dashboard must never show."""


def test_refused_deliveries_are_counted_shown_and_listed_without_bodies(app):
    refusals.discard_pending()
    body = envelope.build(secret_work, (SECRET_ARGUMENT,))
    app.post("/_ah/queue/deferred", body[:-1] + b"\0", headers=TASK, status=403)
    app.post("/_ah/queue/deferred", b"not an envelope", headers=TASK, status=403)
    app.post("/_ah/queue/deferred", body, status=403)

    data = app.get(f"{P}/api/refused").json
    assert data["total"] == 3
    assert {reason: count for reason, count in data["counts"].items() if count} == {
        "bad-signature": 1,
        "unsigned": 1,
        "not-from-queue": 1,
    }
    assert [(e["reason"], e["queue"], e["task_name"]) for e in data["examples"]] == [
        ("not-from-queue", None, None),
        ("unsigned", "default", "t-refused"),
        ("bad-signature", "default", "t-refused"),
    ]
    page = app.get(f"{P}/refused")
    assert "bad signature or unknown key" in page.text and "t-refused" in page.text
    overview = app.get(P)
    assert f'href="{P}/refused">3</a>' in overview.text
    for text in (page.text, overview.text, str(data)):
        assert SECRET_ARGUMENT not in text and "secret_work" not in text
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]


def test_nothing_refused_says_so(app):
    refusals.discard_pending()
    overview = app.get(P)
    assert "none: every delivery was signed for its task" in overview.text
    assert app.get(f"{P}/api/refused").json["total"] == 0


def test_a_version_skew_failure_is_retried_on_the_version_that_made_it(app, monkeypatch):
    pause("default")
    gae_deferred.configure(app_version="v1")
    body = envelope.build(secret_work, (1,))
    gae_deferred.configure(app_version="v2")
    record_id = failures.failure_id("default", "skewed")
    failures.kept_payload(record_id, body).put()
    failures.update(
        None,
        record_id,
        function="tests.dashboard.test_refused.secret_work",
        exception_type="gae_deferred.errors.VersionSkewError",
        message="version skew: ...",
        traceback="",
        state=failures.FailureState.DEAD,
        task_name="skewed",
        queue="default",
        meta=envelope.read_header(body),
        payload_id=None,
        when=gae_deferred.spillover.now(),
    ).put()
    detail = app.get(f"{P}/failures/{record_id}")
    assert "Retry on v1, the version that made it" in detail.text
    assert app.get(f"{P}/api/failures/{record_id}").json["made_by_version"] == "v1"
    token = form_token(detail)
    done = app.post(f"{P}/failures/{record_id}/retrigger", {"csrf_token": token, "version": "v1"})
    assert done.status_int == 303
    (task,) = queued_tasks("default")
    assert task.app_engine_http_request.app_engine_routing.version == "v1"


def test_a_python27_body_outside_the_drain_is_shown_as_a_legacy_pickle_refusal(app):
    refusals.discard_pending()
    task = {"X-AppEngine-QueueName": "reports", "X-AppEngine-TaskName": "from-python27"}
    app.post("/_ah/queue/deferred", BODIES["spilled"], headers=task, status=403)
    page = app.get(f"{P}/refused")
    assert "legacy pickle outside the drain window" in page.text
    assert "from-python27" in page.text and "reports" in page.text
    assert "configure legacy_pickles_until" in page.text
    [example] = app.get(f"{P}/api/refused").json["examples"]
    assert (example["reason"], example["queue"]) == ("legacy-pickle", "reports")
