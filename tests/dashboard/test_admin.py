"""The admin dashboard under WebTest: every page, action and API call, and its security.

The app runs on the in-memory Datastore stub (``ndb_stub``, which validates index.yaml) and the
real CloudTasksClient talks to an in-process Cloud Tasks emulator on a free port.
"""

from __future__ import annotations

import datetime
import json
import re
import threading

import pytest
import webapp2
import webtest
from google.api_core import exceptions as api_exceptions
from google.cloud import ndb

import gae_deferred
from gae_deferred import (
    FailureState,
    PayloadState,
    audit,
    envelope,
    failures,
    spillover,
)
from gae_deferred.webapp2 import _admin_auth, deferred_routes
from tests.dashboard.support import (
    LOOPBACK,
    XSS,
    CertsResponse,
    P,
    assert_inert,
    chunk_reads,
    csrf_token,
    form_token,
    iap_claims,
    iap_signer,
    make_failure,
    make_spilled,
    pause,
    queued_tasks,
    run_as_cloud_tasks_would,
    sample,
)

# -- pages render, escape, and never read payload bytes ------------------------------------


def test_overview_shows_queues_counts_and_svg_charts(app, ndb_stub):
    make_spilled("a1", size=150_000)
    make_spilled("a2", state=PayloadState.DEAD)
    make_failure("t1")
    page = app.get(P)
    assert page.status_int == 200
    assert "local mode" in page.text
    for queue in ("default", "reports"):
        assert f'href="{P}/queues/{queue}"' in page.text
    assert "running" in page.text and "20/s" in page.text
    # One script, the dashboard's own file (live refresh); no inline script.
    scripts = re.findall(r"<script[^>]*>", page.text)
    assert page.text.count("<svg") == 3
    assert scripts == [f'<script src="{P}/static/live.js" defer>']
    data = app.get(f"{P}/api/overview").json
    assert data["spill_counts"] == {"pending": 1, "retrying": 0, "permanent": 0, "dead": 1}
    assert data["stored_bytes"] > 150_000 and data["failures_hour"] == 1
    assert sum(n for _, n in data["size_histogram"]) == 2
    assert sum(n for _, n in data["failures_by_hour"]) == 1
    assert {q["name"] for q in data["queues"]} == {"default", "reports"}


def test_spillover_list_shows_fields_and_reads_no_chunks(app, ndb_stub):
    make_spilled("s1", size=1000)
    reads = chunk_reads(ndb_stub)
    page = app.get(f"{P}/spillover")
    assert "tests.dashboard.support.sample" in page.text and "d-s1" in page.text
    item = app.get(f"{P}/api/spillover").json["items"][0]
    assert set(item) >= {
        "id",
        "function",
        "queue",
        "task_name",
        "payload_bytes",
        "stored_bytes",
        "chunks",
        "state",
        "created",
        "attempts",
    }
    assert item["id"] == "s1" and item["chunks"] == 1 and item["state"] == "pending"
    detail = app.get(f"{P}/spillover/s1")
    assert "1, 2, b&#39;" in detail.text and "cloudpickle" in detail.text
    assert reads == []


def test_spillover_xss_in_function_and_args_renders_inert(app, ndb_stub):
    make_spilled("x1", function=XSS, args=(XSS,))
    assert_inert(app.get(f"{P}/spillover"))
    assert_inert(app.get(f"{P}/spillover/x1"))


def test_spillover_paging_sorting_and_filters(app, ndb_stub):
    base = spillover.now() - datetime.timedelta(hours=1)
    for number in range(5):
        make_spilled(
            f"p{number}",
            size=number * 10_000,
            queue="reports" if number % 2 else "default",
            created=base + datetime.timedelta(minutes=number),
        )
    make_spilled("gone", state=PayloadState.DEAD, function="other.fn")
    seen, cursor = [], None
    while True:
        url = f"{P}/api/spillover?limit=2" + (f"&cursor={cursor}" if cursor else "")
        data = app.get(url).json
        seen += [item["id"] for item in data["items"]]
        cursor = data["next_cursor"]
        if not cursor:
            break
    assert seen == ["p0", "p1", "p2", "p3", "p4"]
    largest = app.get(f"{P}/api/spillover?sort=largest").json["items"]
    assert [item["id"] for item in largest] == ["p4", "p3", "p2", "p1", "p0"]
    reports = app.get(f"{P}/api/spillover?queue=reports&sort=newest").json["items"]
    assert [item["id"] for item in reports] == ["p3", "p1"]
    dead = app.get(f"{P}/api/spillover?state=dead&function=other.fn&queue=default").json
    assert [item["id"] for item in dead["items"]] == ["gone"]
    page = app.get(f"{P}/spillover?limit=2")
    assert "Showing 1 to 2 of 5" in page.text and "Previous" not in page.text
    next_page = page.click("Next →")
    assert "d-p2" in next_page.text and "d-p0" not in next_page.text
    assert "Showing 3 to 4 of 5" in next_page.text
    last = next_page.click("Next →")
    assert "Showing 5 to 5 of 5" in last.text and "Next →" not in last.text
    back = last.click("← Previous")
    assert "Showing 3 to 4 of 5" in back.text and "d-p2" in back.text
    first = back.click("← Previous")
    assert "Showing 1 to 2 of 5" in first.text and "d-p0" in first.text
    assert "Previous" not in first.text
    assert app.get(f"{P}/api/spillover?limit=2").json["total"] == 5


@pytest.mark.parametrize(
    "query",
    [
        "cursor=garbage",
        "cursor=Zm9v.AAAAAAAAAAAAAAAAAAAAAA",
        "state=nope",
        "sort=sideways",
        "limit=0",
        "limit=abc",
        "since=yesterday",
        "sort=attempts&since=1h",
    ],
)
def test_spillover_bad_input_is_400_or_404_never_500(app, ndb_stub, query):
    page = app.get(f"{P}/spillover?{query}", expect_errors=True)
    assert page.status_int in (400, 404)
    assert "Error" in page.text
    api = app.get(f"{P}/api/spillover?{query}", expect_errors=True)
    assert api.status_int == page.status_int and "error" in api.json


def test_cursor_of_another_sort_is_rejected(app, ndb_stub):
    for number in range(3):
        make_spilled(f"c{number}")
    cursor = app.get(f"{P}/api/spillover?limit=1").json["next_cursor"]
    assert app.get(f"{P}/api/spillover?limit=1&cursor={cursor}").status_int == 200
    other = app.get(f"{P}/api/spillover?limit=1&sort=largest&cursor={cursor}", expect_errors=True)
    assert other.status_int == 400


@pytest.mark.parametrize(
    "url",
    [
        "/spillover/nope",
        "/spillover/bad%20id",
        "/failures/f-0000",
        "/failures/..",
        "/queues/nope",
        "/queues/bad_queue",
        "/no/such/page",
    ],
)
def test_bad_ids_are_404(app, ndb_stub, url):
    assert app.get(P + url, expect_errors=True).status_int == 404
    api = app.get(f"{P}/api{url}", expect_errors=True)
    assert api.status_int == 404 and api.json["status"] == 404


# -- spillover actions ---------------------------------------------------------------------


def test_retrigger_spilled_payload_creates_a_fresh_task(app, ndb_stub):
    pause("default")
    make_spilled("r1", state=PayloadState.DEAD)
    detail = app.get(f"{P}/spillover/r1")
    form = detail.forms[0]
    form["version"] = "v2"
    done = form.submit()
    assert done.status_int == 303 and done.location.endswith(f"{P}/spillover")
    assert "Retriggered" in done.follow().text
    record = spillover.get("r1")
    assert record.state == PayloadState.PENDING and record.task_name.startswith("r-")
    (task,) = queued_tasks("default")
    assert task.name.endswith("/" + record.task_name)
    assert task.app_engine_http_request.relative_uri == "/_ah/queue/deferred/test_admin.sample"
    assert task.app_engine_http_request.app_engine_routing.version == "v2"
    body = envelope.read_header(task.app_engine_http_request.body)
    assert body["ref"]["id"] == "r1"
    audit_page = app.get(f"{P}/audit")
    assert "retrigger" in audit_page.text and "spillover/r1" in audit_page.text
    assert "local (127.0.0.1)" in audit_page.text


def test_retrigger_bad_version_is_400(app, ndb_stub):
    make_spilled("r2")
    token = csrf_token(app)
    response = app.post(
        f"{P}/api/spillover/r2/retrigger",
        {"version": "Not A Version"},
        headers={"X-CSRF-Token": token},
        expect_errors=True,
    )
    assert response.status_int == 400


def test_delete_spilled_payload_asks_then_deletes_record_chunks_and_task(app, ndb_stub):
    pause("default")
    record = make_spilled("d1", size=10)
    token = csrf_token(app)
    app.post_json(f"{P}/api/spillover/d1/retrigger", {}, headers={"X-CSRF-Token": token})
    assert len(queued_tasks("default")) == 1
    confirm = app.get(f"{P}/spillover/d1").forms[1].submit()
    assert "Delete the spilled payload" in confirm.text
    assert spillover.get("d1") is not None
    done = confirm.forms[0].submit().follow()
    assert "Deleted" in done.text
    assert ndb.get_multi(
        [spillover.payload_key("d1"), *spillover.chunk_keys("d1", record.chunks)]
    ) == [
        None,
        None,
    ]
    assert queued_tasks("default") == []


def test_bulk_retrigger_and_delete_with_confirmation(app, ndb_stub):
    pause("default")
    for number in range(3):
        make_spilled(f"b{number}", state=PayloadState.DEAD)
    page = app.get(f"{P}/spillover?state=dead")
    form = page.forms[1]
    form.get("ids", index=0).checked = True
    form.get("ids", index=1).checked = True
    confirm = form.submit("action", value="retrigger")
    assert "Retrigger 2 spilled payloads?" in confirm.text
    assert ">Retrigger 2 spilled payloads</button>" in confirm.text
    assert len(queued_tasks("default")) == 0
    done = confirm.forms[0].submit().follow()
    assert "2 done, 0 failed" in done.text
    assert len(queued_tasks("default")) == 2
    token = csrf_token(app)
    result = app.post_json(
        f"{P}/api/spillover/bulk",
        {"action": "delete", "ids": ["b2", "missing"]},
        headers={"X-CSRF-Token": token},
    ).json
    assert result["done"] == ["b2"] and "missing" in result["errors"]
    too_many = app.post_json(
        f"{P}/api/spillover/bulk",
        {"action": "delete", "ids": [f"x{n}" for n in range(101)]},
        headers={"X-CSRF-Token": token},
        expect_errors=True,
    )
    assert too_many.status_int == 400
    bad = app.post_json(
        f"{P}/api/spillover/bulk",
        {"action": "explode", "ids": ["b0"]},
        headers={"X-CSRF-Token": token},
        expect_errors=True,
    )
    assert bad.status_int == 400


# -- failures ------------------------------------------------------------------------------


def test_failure_groups_list_and_detail_render_inert(app, ndb_stub):
    make_failure("t1", function=XSS, message=XSS, traceback=f"Traceback\n  {XSS}")
    make_failure("t2", function=XSS, message="second")
    make_failure("t3", exception_type="KeyError", state=FailureState.RETRYING)
    make_failure("t4", state=FailureState.RESOLVED)
    groups = app.get(f"{P}/failures")
    assert_inert(groups)
    assert "KeyError" in groups.text
    api = app.get(f"{P}/api/failures/groups").json["items"]
    counts = {item["group"]: item["count"] for item in api}
    assert counts == {f"{XSS}|ValueError": 2, "test_admin.sample|KeyError": 1}
    listing = app.get(f"{P}/failures/list", {"group": f"{XSS}|ValueError"})
    assert_inert(listing)
    assert listing.text.count("<details") == 2
    record_id = failures.failure_id("default", "t1")
    assert_inert(app.get(f"{P}/failures/{record_id}"))
    item = app.get(f"{P}/api/failures?state=dead").json["items"][0]
    assert set(item) >= {
        "id",
        "function",
        "exception_type",
        "message",
        "traceback",
        "attempts",
        "state",
        "first_seen",
        "last_seen",
        "task_name",
        "queue",
    }
    resolved = app.get(f"{P}/api/failures/groups?view=resolved").json["items"]
    assert [g["exception_type"] for g in resolved] == ["ValueError"]


def test_failure_list_paging_and_bad_cursor(app, ndb_stub):
    for number in range(3):
        make_failure(f"pg{number}")
    first = app.get(f"{P}/api/failures?limit=2&state=dead").json
    assert len(first["items"]) == 2 and first["next_cursor"]
    second = app.get(f"{P}/api/failures?limit=2&state=dead&cursor={first['next_cursor']}").json
    assert len(second["items"]) == 1 and second["next_cursor"] is None
    wrong = app.get(f"{P}/api/failures?limit=2&cursor={first['next_cursor']}", expect_errors=True)
    assert wrong.status_int == 400
    assert app.get(f"{P}/failures/list?state=bogus", expect_errors=True).status_int == 400
    assert app.get(f"{P}/failures?view=bogus", expect_errors=True).status_int == 400


def test_retry_now_inline_failure_enqueues_its_kept_envelope(app, ndb_stub):
    pause("reports")
    record = make_failure("inline1", queue="reports")
    page = app.get(f"{P}/failures/{record.id}")
    done = page.forms[0].submit().follow()
    assert "Retrying failure" in done.text
    (task,) = queued_tasks("reports")
    request = task.app_engine_http_request
    header = envelope.read_header(request.body)
    # Re-signed for the new task, carrying the record it updates; the call itself unchanged.
    assert (header["task"], header["queue"]) == (task.name.rsplit("/", 1)[1], "reports")
    assert header["failure_id"] == record.id
    assert "X-Deferred-Failure-Id" not in request.headers
    assert request.relative_uri == "/_ah/queue/deferred/tests.dashboard.support.sample"
    kept = failures.get_payload(record.id)
    assert envelope.open_envelope(request.body).body == envelope.open_envelope(kept).body
    again = failures.get(record.id)
    assert again.state == FailureState.RETRYING and again.retriggered == 1
    run_as_cloud_tasks_would(app, task)
    assert failures.get(record.id).state == FailureState.RESOLVED


def test_retry_now_spilled_failure_points_at_the_stored_payload(app, ndb_stub):
    pause("default")
    make_spilled("sp1", state=PayloadState.DEAD)
    record = make_failure("spilled1", payload_id="sp1")
    token = csrf_token(app)
    result = app.post_json(
        f"{P}/api/failures/{record.id}/retrigger",
        {"version": "v7"},
        headers={"X-CSRF-Token": token},
    ).json
    (task,) = queued_tasks("default")
    assert task.name.endswith(result["task_name"])
    header = envelope.read_header(task.app_engine_http_request.body)
    assert header["failure_id"] == record.id and header["task"] == result["task_name"]
    assert task.app_engine_http_request.app_engine_routing.version == "v7"
    assert header["ref"]["id"] == "sp1"
    assert spillover.get("sp1").state == PayloadState.PENDING
    run_as_cloud_tasks_would(app, task)
    assert failures.get(record.id).state == FailureState.RESOLVED
    assert spillover.get("sp1") is None


@pytest.mark.parametrize("spilled", [False, True])
def test_a_retry_whose_task_runs_before_the_enqueue_returns_stays_resolved(
    app, ndb_stub, monkeypatch, spilled
):
    """Cloud Tasks may run a new task before CreateTask's answer is back. The retry wrote
    "retrying" after the enqueue, over the "resolved" that run had written (the browser suite
    caught it: a retried group never showed as resolved)."""
    pause("default")
    if spilled:
        make_spilled("race1", state=PayloadState.DEAD)
    record = make_failure("race", payload_id="race1" if spilled else None)
    create = gae_deferred.enqueue.create_task

    def create_and_run_at_once(spec, body):
        created = create(spec, body)
        (task,) = queued_tasks(spec.queue)  # with its body, which CreateTask's answer lacks
        assert task.name == created.name
        # Delivered on a thread of its own, as Cloud Tasks' request would be served.
        delivery = threading.Thread(target=run_as_cloud_tasks_would, args=(app, task))
        delivery.start()
        delivery.join()
        return created

    monkeypatch.setattr(gae_deferred.enqueue, "create_task", create_and_run_at_once)
    done = app.get(f"{P}/failures/{record.id}").forms[0].submit().follow()
    assert "Retrying failure" in done.text
    after = failures.get(record.id)
    assert (after.state, after.retriggered) == (FailureState.RESOLVED, 1)


def test_a_retry_whose_task_cannot_be_created_leaves_the_failure_as_it_was(
    app, ndb_stub, monkeypatch
):
    record = make_failure("unsent", state=FailureState.DEAD)

    def unavailable(spec, body):
        raise api_exceptions.ServiceUnavailable("Cloud Tasks is down")

    monkeypatch.setattr(gae_deferred.enqueue, "create_task", unavailable)
    answer = app.get(f"{P}/failures/{record.id}").forms[0].submit(expect_errors=True)
    assert answer.status_int >= 400
    after = failures.get(record.id)
    assert (after.state, after.retriggered or 0) == (FailureState.DEAD, 0)
    entries, _ = audit.recent(10)
    assert not [entry for entry in entries if entry.target == f"failure/{record.id}"]


def test_dismiss_then_retry_is_refused_and_delete_removes(app, ndb_stub):
    record = make_failure("dm1")
    token = csrf_token(app)
    headers = {"X-CSRF-Token": token}
    app.post_json(f"{P}/api/failures/{record.id}/dismiss", {}, headers=headers)
    assert failures.get(record.id).state == FailureState.DISMISSED
    refused = app.post_json(
        f"{P}/api/failures/{record.id}/retrigger", {}, headers=headers, expect_errors=True
    )
    assert refused.status_int == 409
    page = app.get(f"{P}/failures/{record.id}")
    confirm = page.forms[len(page.forms) - 1].submit()
    assert "Delete the failure record" in confirm.text
    assert '<button type="submit" class="danger">Delete 1 failure</button>' in confirm.text
    confirm.forms[0].submit()
    assert failures.get(record.id) is None and failures.get_payload(record.id) is None


def test_bulk_retry_of_a_group(app, ndb_stub):
    pause("default")
    for number in range(3):
        make_failure(f"g{number}", exception_type="TimeoutError")
    make_failure("other", exception_type="KeyError")
    groups = app.get(f"{P}/failures")
    form = next(f for f in groups.forms.values() if "TimeoutError" in f["group"].value)
    confirm = form.submit()
    assert "Retry 3 failures where" in confirm.text
    assert ">Retry 3 failures</button>" in confirm.text and 'class="danger"' not in confirm.text
    done = confirm.forms[0].submit().follow()
    assert "Retried 3 failures" in done.text
    assert len(queued_tasks("default")) == 3
    token = csrf_token(app)
    none_left = app.post_json(
        f"{P}/api/failures/retry-group",
        {"group": "nobody|Nothing"},
        headers={"X-CSRF-Token": token},
        expect_errors=True,
    )
    assert none_left.status_int == 404


def test_retry_group_from_a_state_tab_retries_that_state_only(app, ndb_stub):
    """Before: "Retry group…" on the dead tab also retried the group's retrying and permanent
    failures."""
    pause("default")
    dead = [make_failure(f"d{n}", exception_type="TimeoutError") for n in range(2)]
    other = [
        make_failure("r0", exception_type="TimeoutError", state=FailureState.RETRYING),
        make_failure("p0", exception_type="TimeoutError", state=FailureState.PERMANENT),
    ]
    groups = app.get(f"{P}/failures?view=dead")
    form = next(f for f in groups.forms.values() if "TimeoutError" in f["group"].value)
    assert form["view"].value == "dead"
    confirm = form.submit()
    assert ">Retry 2 dead failures</button>" in confirm.text
    done = confirm.forms[0].submit()
    assert done.location.endswith("/failures?view=dead")
    assert "Retried 2 failures" in done.follow().text
    assert {failures.get(r.id).state for r in dead} == {FailureState.RETRYING}
    assert failures.get(other[1].id).state == FailureState.PERMANENT
    assert len(queued_tasks("default")) == 2
    token = csrf_token(app)
    wrong = app.post_json(
        f"{P}/api/failures/retry-group",
        {"group": dead[0].group, "view": "resolved"},
        headers={"X-CSRF-Token": token},
        expect_errors=True,
    )
    assert wrong.status_int == 400


# -- queues and tasks ----------------------------------------------------------------------


def test_queue_tasks_run_delete_pause_resume_purge(app, ndb_stub):
    pause("reports")
    gae_deferred.defer(sample, 1, _queue="reports", _countdown=3600)
    gae_deferred.defer(sample, 2, _queue="reports", _countdown=3600)
    queues = app.get(f"{P}/api/queues").json["items"]
    reports = next(q for q in queues if q["name"] == "reports")
    assert reports["state"] == "PAUSED" and reports["tasks"] == 2 and reports["rate"] == "2/s"
    assert reports["retry"]["max_attempts"] == 4
    page = app.get(f"{P}/queues/reports")
    assert "paused" in page.text and "Resume queue" in page.text
    names = [t["name"] for t in app.get(f"{P}/api/queues/reports/tasks").json["items"]]
    assert len(names) == 2
    run = next(f for f in page.forms.values() if f.action.endswith(f"/{names[0]}/run"))
    assert "dispatched" in run.submit().follow().text
    delete = next(f for f in page.forms.values() if f.action.endswith(f"/{names[1]}/delete"))
    deleted = delete.submit().forms[0].submit().follow()
    assert f"Task {names[1]} deleted." in deleted.text
    assert names[1] not in app.get(f"{P}/queues/reports").text  # the message shows once
    resume = app.get(f"{P}/queues/reports").forms[0]
    resume.submit()
    assert app.get(f"{P}/api/queues/reports/tasks").json["state"] == "RUNNING"
    pause("reports")
    gae_deferred.defer(sample, 3, _queue="reports", _countdown=3600)
    purge = next(f for f in app.get(f"{P}/queues/reports").forms.values() if "purge" in f.action)
    confirm = purge.submit()
    assert "Purge queue reports?" in confirm.text
    assert len(queued_tasks("reports")) >= 1
    confirm.forms[0].submit()
    assert queued_tasks("reports") == []
    actions = [e["action"] for e in app.get(f"{P}/api/audit").json["items"]]
    assert {"run", "delete", "resume", "purge"} <= set(actions)


def test_task_actions_on_unknown_things_are_404(app, ndb_stub):
    token = csrf_token(app)
    headers = {"X-CSRF-Token": token}
    for url in (
        "/queues/nope/pause",
        "/queues/default/tasks/nope/run",
        "/queues/default/tasks/bad%20name/delete",
    ):
        response = app.post_json(f"{P}/api{url}", {}, headers=headers, expect_errors=True)
        assert response.status_int == 404, url
    bad_token = app.get(f"{P}/api/queues/default/tasks?cursor=%00%01", expect_errors=True)
    assert bad_token.status_int == 400


# -- access control, CSRF, headers ---------------------------------------------------------

SECURITY = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@pytest.mark.parametrize("url", [P, f"{P}/spillover", f"{P}/api/spillover", f"{P}/nope"])
def test_every_response_has_security_headers(app, ndb_stub, url):
    response = app.get(url, expect_errors=True)
    for header, value in SECURITY.items():
        assert response.headers[header] == value
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy


def test_non_loopback_and_non_local_requests_are_denied(app, ndb_stub):
    make_spilled("n1")
    outsider = {"REMOTE_ADDR": "203.0.113.9"}
    for url in (P, f"{P}/spillover", f"{P}/api/spillover", f"{P}/spillover/n1"):
        response = app.get(url, extra_environ=outsider, expect_errors=True)
        assert response.status_int == 403
        assert "n1" not in response.text
    assert "local mode" not in app.get(P, extra_environ=outsider, expect_errors=True).text
    forged = app.get(
        f"{P}/api/spillover",
        extra_environ=outsider,
        headers={"X-Appengine-User-Is-Admin": "1"},
        expect_errors=True,
    )
    assert forged.status_int == 403
    gae_deferred.configure(local_mode=False)
    assert app.get(P, expect_errors=True).status_int == 403


def test_app_engine_admin_header_is_trusted_only_on_app_engine(app, ndb_stub, monkeypatch):
    gae_deferred.configure(local_mode=False)
    headers = {"X-Appengine-User-Is-Admin": "1", "X-Appengine-User-Email": "ops@example.com"}
    assert app.get(P, headers=headers, expect_errors=True).status_int == 403
    monkeypatch.setenv("GAE_ENV", "standard")
    page = app.get(P, headers=headers)
    assert "ops@example.com" in page.text and "local mode" not in page.text
    assert (
        app.get(P, headers={"X-Appengine-User-Is-Admin": "0"}, expect_errors=True).status_int == 403
    )


def test_admin_hook_decides_and_names_the_actor(app, ndb_stub):
    make_spilled("h1")
    gae_deferred.configure(
        local_mode=False,
        admin_hook=lambda environ: "hook@example.com" if environ.get("HTTP_X_TEST") else None,
    )
    assert app.get(P, expect_errors=True).status_int == 403
    token = app.get(f"{P}/api/csrf", headers={"X-Test": "1"}).json["csrf_token"]
    app.post_json(
        f"{P}/api/spillover/h1/delete", {}, headers={"X-Test": "1", "X-CSRF-Token": token}
    )
    entry = app.get(f"{P}/api/audit", headers={"X-Test": "1"}).json["items"][0]
    assert entry["actor"] == "hook@example.com" and entry["action"] == "delete"


def test_posts_without_a_valid_csrf_token_change_nothing(app, ndb_stub):
    make_spilled("v1", state=PayloadState.DEAD)
    page = app.get(f"{P}/spillover/v1")
    token = form_token(page)
    cookie = app.cookies["deferred_admin_csrf"]
    assert len(cookie) == 64
    set_cookie = app.get(f"{P}/api/csrf", extra_environ={**LOOPBACK}).headers.getall("Set-Cookie")
    assert set_cookie == []  # already set; the first response set it
    for data, headers in (
        ({}, {}),
        ({"csrf_token": "0" * 64}, {}),
        ({}, {"X-CSRF-Token": token[:-1] + ("0" if token[-1] != "0" else "1")}),
    ):
        response = app.post(
            f"{P}/spillover/v1/retrigger", data, headers=headers, expect_errors=True
        )
        assert response.status_int == 403 and "CSRF" in response.text
    app.set_cookie("deferred_admin_csrf", "f" * 64)
    stale = app.post(f"{P}/spillover/v1/retrigger", {"csrf_token": token}, expect_errors=True)
    assert stale.status_int == 403
    assert spillover.get("v1").state == PayloadState.DEAD
    assert app.get(f"{P}/api/audit").json["items"] == []


def test_csrf_cookie_flags_and_get_never_changes_state(ndb_stub, fresh_tasks_emulator):
    gae_deferred.configure(local_mode=True)
    fresh = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()), extra_environ=LOOPBACK)
    make_spilled("g1", state=PayloadState.DEAD)
    header = fresh.get(P).headers["Set-Cookie"].lower()
    assert "httponly" in header and "samesite=strict" in header
    assert "path=/_ah/deferred-admin" in header
    for url in ("/spillover/g1/retrigger", "/spillover/g1/delete", "/queues/default/purge"):
        assert fresh.get(P + url, expect_errors=True).status_int == 405
    assert spillover.get("g1").state == PayloadState.DEAD


def test_cron_sweep_accepts_only_app_engine_cron(app, ndb_stub, monkeypatch):
    gae_deferred.configure(local_mode=False)
    cron = {"X-Appengine-Cron": "true"}
    assert app.get(f"{P}/cron/sweep", headers=cron, expect_errors=True).status_int == 403
    monkeypatch.setenv("GAE_ENV", "standard")
    result = app.get(f"{P}/cron/sweep", headers=cron).json
    assert result["ok"] is True and "reenqueued" in result["report"]
    assert app.get(f"{P}/cron/sweep", expect_errors=True).status_int == 403
    # A scheduled sweep with nothing to do leaves the audit log alone; one that acts is audited.
    assert audit.recent()[0] == []
    stale = make_spilled("stale", state=PayloadState.DEAD)
    stale.updated = spillover.now() - datetime.timedelta(days=60)
    stale.put()
    assert app.get(f"{P}/cron/sweep", headers=cron).json["report"]["purged_payloads"] == 1
    (entry,) = audit.recent()[0]
    assert (entry.actor, entry.action, entry.detail) == ("cron", "sweep", "purged_payloads 1")


def test_run_sweeper_button(app, ndb_stub):
    page = app.get(P)
    form = next(f for f in page.forms.values() if f.action.endswith("/sweep"))
    done = form.submit().follow()
    assert "Sweeper ran" in done.text
    assert app.get(f"{P}/api/audit").json["items"][0]["action"] == "sweep"


def test_static_css_and_templates_do_not_depend_on_cwd(app, ndb_stub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    css = app.get(f"{P}/static/admin.css")
    assert css.content_type == "text/css" and "font-family" in css.text
    assert app.get(f"{P}/static/..%2Fapp.yaml", expect_errors=True).status_int == 404
    assert app.get(f"{P}/static/nope.css", expect_errors=True).status_int == 404
    assert app.get(P).status_int == 200


def test_auto_refresh_toggle_is_a_meta_refresh(app, ndb_stub):
    assert 'http-equiv="refresh"' not in app.get(f"{P}/spillover").text
    page = app.get(f"{P}/spillover?refresh=30")
    # Without JavaScript a meta refresh; with it, live.js swaps the content in (no reload).
    assert '<noscript><meta http-equiv="refresh" content="30"></noscript>' in page.text
    assert '<body data-refresh="30">' in page.text and "/static/live.js" in page.text
    # The choice follows the user to other pages (a cookie), until turned off.
    assert '<body data-refresh="30">' in app.get(f"{P}/audit").text
    assert 'http-equiv="refresh"' not in app.get(f"{P}/spillover?refresh=0").text
    assert '<body data-refresh="0">' in app.get(f"{P}/audit").text
    assert 'http-equiv="refresh"' not in app.get(f"{P}/spillover?refresh=7").text


def test_iap_jwt_is_verified_against_locally_served_keys(app, ndb_stub, monkeypatch):
    """A real ES256 IAP token verified by google.auth.jwt; only the HTTP fetch of IAP's public
    keys is answered locally."""
    import time

    from google.auth import jwt

    audience = "/projects/123/apps/test-project"
    signer, public_pem = iap_signer("key-1")
    stranger, _ = iap_signer("key-1")
    fetched: list[str] = []

    def local_transport():
        def request(url, method="GET", **kwargs):
            fetched.append(url)
            return CertsResponse(json.dumps({"key-1": public_pem}).encode())

        return request

    monkeypatch.setattr(_admin_auth, "iap_transport", local_transport)
    gae_deferred.configure(local_mode=False, iap_audience=audience)
    now = int(time.time())
    good = iap_claims(audience, "iap-user@example.com")

    def token(claims, by=signer):
        return jwt.encode(by, claims).decode()

    def status(value):
        return app.get(
            P, headers={"x-goog-iap-jwt-assertion": value}, expect_errors=True
        ).status_int

    page = app.get(P, headers={"x-goog-iap-jwt-assertion": token(good)})
    assert "iap-user@example.com" in page.text
    assert fetched == [_admin_auth.IAP_CERTS_URL]
    assert status(token({**good, "aud": "/projects/999/apps/other"})) == 403
    assert status(token({**good, "iss": "https://evil.example"})) == 403
    assert status(token({**good, "iat": now - 7200, "exp": now - 3600})) == 403
    assert status(token(good, by=stranger)) == 403
    assert status("not-a-jwt") == 403
    gae_deferred.configure(iap_audience=None)
    assert status(token(good)) == 403
