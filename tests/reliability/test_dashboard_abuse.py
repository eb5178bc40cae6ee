"""Dashboard abuse: non-admins, missing or forged CSRF tokens, XSS in every stored field, absurd
cursors and ids. Every request is rejected (403/400/404) or rendered inert — never a 500.

Admin checks run against the real gunicorn app of the reliability stack (local mode: loopback
is admin); the non-admin case runs the same routes in-process with local mode off and a
non-loopback REMOTE_ADDR.
"""

from __future__ import annotations

import datetime
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import webapp2
import webtest
from google.cloud import ndb

import gae_deferred
from gae_deferred import FailureState, admin, failures, spillover
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
    "/metrics",
    "/metrics?window=7d&sort=p95",
    "/failures/list?function=a&exception=b&queue=c&q=d&since=1h&until=2026-01-01",
    "/api/metrics",
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
    "/spillover/bulk-matching",
    "/failures/bulk-matching",
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
        "/failures/list?function=" + requests.utils.quote(XSS),
        "/metrics?function=" + requests.utils.quote(XSS),
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


def _failure(record_id: str, queue: str) -> None:
    """A failure record under ``record_id``, as older versions wrote one from a header."""
    now = datetime.datetime.now(datetime.UTC)
    with datastore():
        record = failures.update(
            None,
            record_id,
            function="legacy.job",
            exception_type="ValueError",
            message=f"crafted {record_id}",
            traceback="Traceback",
            state=FailureState.DEAD,
            task_name="t",
            queue=queue,
            meta={"function": "legacy.job"},
            payload_id=None,
            when=now,
        )
        ndb.put_multi([record, failures.group_entity(record)])


def _form_actions(html: str, page_url: str) -> list[str]:
    """Where the page's forms post, resolved as a browser does (dot segments removed)."""
    return [
        urllib.parse.urljoin(page_url, action) for action in re.findall(r'action="([^"]+)"', html)
    ]


def test_crafted_failure_ids_cannot_hijack_dashboard_actions(rel: LocalStack) -> None:
    """Before the fix, Dismiss on ``../queues/<q>/pause?y=`` paused the queue, and Delete on
    ``../../queues/<q>/purge?confirm=yes&`` purged it without asking, with a valid token."""
    base = rel.app_url + P
    session = requests.Session()
    token = session.get(base + "/api/csrf", timeout=30).json()["csrf_token"]
    crafted = {
        "dismiss": "../queues/fault/pause?y=",
        "delete": "../../queues/fault/purge?confirm=yes&",
    }
    for record_id in crafted.values():
        _failure(record_id, "fault")
    listing_url = base + "/failures/list?function=legacy"
    listing = session.get(listing_url, timeout=30)
    actions = _form_actions(listing.text, listing_url)
    for verb, record_id in crafted.items():
        url = f"{base}/failures/{admin.url_id(record_id)}/{verb}"
        assert url in actions, (verb, actions)
        answer = session.post(url, data={"csrf_token": token, "back": listing_url}, timeout=30)
        assert answer.status_code == 200, answer.status_code  # delete asks first; dismiss done
    queues = {
        q["name"]: q["state"] for q in session.get(base + "/api/queues", timeout=30).json()["items"]
    }
    assert queues["fault"] == "RUNNING"
    with datastore():
        assert failures.get(crafted["dismiss"]).state == FailureState.DISMISSED
        assert failures.get(crafted["delete"]) is not None  # only a confirmation was shown
        for record_id in crafted.values():
            failures.failure_key(record_id).delete()
    audit = session.get(base + "/api/audit", timeout=30).json()["items"]
    assert not [e for e in audit if e["target"].startswith("queue/fault")]


MALFORMED = [
    ("GET", "/%ff"),
    ("GET", "/failures/%ff%fe"),
    ("GET", "/api/%c0%af"),
    ("POST", "/queues/default/%ff/pause"),
    ("GET", "/static/%ff.css"),
    *[
        (method, path)
        for method in ("PATCH", "PUT", "DELETE", "OPTIONS", "TRACE")
        for path in (
            "",
            "/failures/list",
            "/api/spillover",
            "/queues/default/purge",
            "/static/admin.css",
        )
    ],
]
#: (inputs tried, answered 5xx) per run, printed for docs/reliability.md.
SECURITY_HEADER_NAMES = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options")


def test_malformed_paths_and_methods_get_4xx_with_security_headers(rel: LocalStack) -> None:
    import http.client

    tried = errors = 0
    host, port = rel.app_url.removeprefix("http://").split(":")
    for method, path in MALFORMED:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request(method, P + path)
        answer = connection.getresponse()
        answer.read()
        connection.close()
        tried += 1
        errors += answer.status >= 500
        assert answer.status in (400, 404, 405), (method, path, answer.status)
        for header in SECURITY_HEADER_NAMES:
            assert answer.getheader(header), (method, path, header)
    print(f"\nmalformed dashboard requests: {tried} tried, {errors} answered 5xx")
    assert rel.dead_children() == []
