"""Dashboard abuse: non-admins, missing or forged CSRF tokens, XSS in every stored field, absurd
cursors and ids. Every request is rejected (403/400/404) or rendered inert — never a 500.

Admin checks run against the real gunicorn app of the reliability stack (local mode: loopback
is admin); the non-admin case runs the same routes in-process with local mode off and a
non-loopback REMOTE_ADDR.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import webapp2
import webtest
from google.cloud import ndb

import gae_deferred
from gae_deferred import FailureState, failures, spillover
from gae_deferred.local.stack import LocalStack
from gae_deferred.webapp2 import deferred_routes
from tests.stack_support import datastore

P = "/_ah/deferred-admin"
XSS = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
XSS_MARKERS = ("<script>alert(1)", "<img src=x onerror")
GET_PAGES = [
    "",
    "/",
    "/spillover",
    "/failures",
    "/failures/groups",
    "/failures/list",
    "/queues",
    "/queues/default",
    "/audit",
    "/api/spillover",
    "/api/failures",
    "/api/queues",
    "/api/overview",
    "/api/csrf",
    "/no/such/page",
]
POST_ACTIONS = [
    "/spillover/x/retrigger",
    "/spillover/x/delete",
    "/spillover/bulk",
    "/failures/x/retrigger",
    "/failures/x/dismiss",
    "/failures/x/delete",
    "/failures/bulk",
    "/failures/retry-group",
    "/queues/default/pause",
    "/queues/default/resume",
    "/queues/default/purge",
    "/queues/default/tasks/t/run",
    "/queues/default/tasks/t/delete",
    "/sweep",
]


@pytest.fixture
def xss_records(rel: LocalStack) -> Iterator[dict[str, str]]:
    """A spilled-payload record and a failure record with XSS in every displayed field."""
    now = datetime.datetime.now(datetime.UTC)
    payload_id = uuid.uuid4().hex
    failure_id = f"f-xss{uuid.uuid4().hex[:20]}"
    meta = {"function": XSS, "args": XSS, "python": XSS, "app_version": XSS, "kid": XSS}
    with datastore():
        record, chunks = spillover.build_record(
            payload_id, b"x" * 10, meta, queue=XSS, task_name=XSS, eta=now, task={"url": XSS}
        )
        spillover.write_many([(record, chunks)])
        failure = failures.update(
            None,
            failure_id,
            function=XSS,
            exception_type=XSS,
            message=XSS,
            traceback=f"Traceback:\n  {XSS}\n",
            state=FailureState.PERMANENT,
            task_name=XSS,
            queue=XSS,
            meta=meta,
            payload_id=None,
            when=now,
        )
        ndb.put_multi(
            [
                failure,
                failures.group_entity(failure),
                failures.kept_payload(failure_id, b"not an envelope"),
            ]
        )
    yield {"payload": payload_id, "failure": failure_id}
    with datastore():
        spillover.delete(payload_id, 1)
        failures.failure_key(failure_id).delete()


def _assert_not_500(response: requests.Response | Any, what: str) -> None:
    status = getattr(response, "status_code", None) or response.status_int
    assert status < 500, f"{what}: {status}"


def test_xss_in_every_field_renders_inert(rel: LocalStack, xss_records: dict[str, str]) -> None:
    base = rel.app_url + P
    pages = [
        *GET_PAGES,
        f"/spillover/{xss_records['payload']}",
        f"/failures/{xss_records['failure']}",
        f"/api/spillover/{xss_records['payload']}",
        f"/api/failures/{xss_records['failure']}",
        "/failures/list?q=" + requests.utils.quote(XSS),
        "/spillover?queue=" + requests.utils.quote(XSS),
        "/queues/" + requests.utils.quote(XSS, safe=""),
    ]
    for page in pages:
        answer = requests.get(base + page, timeout=30)
        _assert_not_500(answer, page)
        if "json" in answer.headers.get("Content-Type", ""):
            continue  # JSON is data, not markup; its content type keeps browsers from rendering
        for marker in XSS_MARKERS:
            assert marker not in answer.text, f"unescaped XSS on {page}"
    listing = requests.get(base + "/api/failures", timeout=30)
    assert listing.headers["Content-Type"].startswith("application/json")
    assert any(item["message"] == XSS for item in listing.json()["items"]), "record not listed"
    detail = requests.get(f"{base}/failures/{xss_records['failure']}", timeout=30)
    assert detail.status_code == 200 and "&lt;script&gt;" in detail.text


def test_posts_without_or_with_forged_csrf_are_403_and_change_nothing(
    rel: LocalStack, xss_records: dict[str, str]
) -> None:
    base = rel.app_url + P
    targets = [
        *POST_ACTIONS,
        f"/spillover/{xss_records['payload']}/delete",
        f"/failures/{xss_records['failure']}/delete",
        f"/api/spillover/{xss_records['payload']}/delete",
        f"/api/failures/{xss_records['failure']}/delete",
    ]
    forged = requests.Session()
    forged.get(base + "/api/csrf", timeout=30)  # a real cookie, but a token of another secret
    for target in targets:
        for session, headers, data in (
            (requests.Session(), {}, {}),
            (forged, {"X-CSRF-Token": "0" * 64}, {}),
            (forged, {}, {"csrf_token": "' OR 1=1 --"}),
            (requests.Session(), {"X-CSRF-Token": "a" * 4000}, {"confirm": "1"}),
        ):
            answer = session.post(base + target, headers=headers, data=data, timeout=30)
            assert answer.status_code == 403, (target, headers, answer.status_code)
    with datastore():
        assert spillover.get(xss_records["payload"]) is not None
        assert failures.get(xss_records["failure"]) is not None


ABSURD = [
    "cursor=" + "A" * 2000,  # gunicorn answers 414 past ~4 KB of request line
    "cursor=%00",
    "cursor=-1",
    "cursor=../../etc/passwd",
    "limit=-5",
    "limit=99999999999999999999",
    "limit=nan",
    "sort=%3Cscript%3E",
    "state=" + "x" * 3000,
    "queue=%00",
]
ABSURD_IDS = ["%00", "..%2F..", "x" * 3000, "%F0%9F%92%A5", "-1", "f-" + "0" * 200, "%25"]


def test_absurd_cursors_and_ids_are_rejected(rel: LocalStack) -> None:
    base = rel.app_url + P
    for page in ("/spillover", "/failures/list", "/api/spillover", "/api/failures", "/audit"):
        for query in ABSURD:
            answer = requests.get(f"{base}{page}?{query}", timeout=30)
            assert answer.status_code in (200, 400, 404), (page, query, answer.status_code)
    token_session = requests.Session()
    token = token_session.get(base + "/api/csrf", timeout=30).json()["csrf_token"]
    for bad in ABSURD_IDS:
        for page in (f"/spillover/{bad}", f"/failures/{bad}", f"/api/spillover/{bad}"):
            answer = requests.get(base + page, timeout=30)
            assert answer.status_code in (400, 404), (page, answer.status_code)
        for action in (f"/api/spillover/{bad}/retrigger", f"/api/failures/{bad}/delete"):
            answer = token_session.post(
                base + action, headers={"X-CSRF-Token": token}, data={"confirm": "1"}, timeout=30
            )
            assert answer.status_code in (400, 404), (action, answer.status_code)
    assert rel.dead_children() == []


def test_query_string_that_is_not_utf8_is_400(rel: LocalStack) -> None:
    for page in ("/spillover", "/api/spillover", "/failures/list"):
        answer = requests.get(f"{rel.app_url}{P}{page}?cursor=%ff", timeout=30)
        assert answer.status_code == 400, (page, answer.status_code)


@pytest.mark.parametrize("remote", ["203.0.113.9", "10.0.0.1", "::ffff:8.8.8.8", ""])
def test_non_admins_are_refused_everywhere(ndb_stub: Any, remote: str) -> None:
    gae_deferred.configure(local_mode=False)
    app = webtest.TestApp(
        webapp2.WSGIApplication(deferred_routes()), extra_environ={"REMOTE_ADDR": remote}
    )
    spoofed = {"X-Forwarded-For": "127.0.0.1", "X-AppEngine-User-Is-Admin": "1"}
    for page in GET_PAGES:
        answer = app.get(P + page, headers=spoofed, expect_errors=True)
        assert answer.status_int == 403, (page, answer.status)
    for action in POST_ACTIONS:
        answer = app.post(P + action, {"confirm": "1"}, headers=spoofed, expect_errors=True)
        assert answer.status_int == 403, (action, answer.status)
