"""The dashboard's search, filters, bulk-by-filter, Post/Redirect/Get, task detail and the
"deferred by" trace, under WebTest on the Datastore stub and the in-process Cloud Tasks emulator.
"""

from __future__ import annotations

import datetime
import os
import re

import pytest
from google.cloud import ndb

import gae_deferred
from gae_deferred import FailureState, PayloadState, audit, failures, spillover, tracing
from tests.dashboard.support import (
    XSS,
    P,
    assert_inert,
    csrf_token,
    make_failure,
    make_spilled,
    pause,
    queued_tasks,
    sample,
)


def ids(response) -> list[str]:
    return [item["id"] for item in response.json["items"]]


def seed_failures() -> dict[str, failures.DeferredFailure]:
    old = spillover.now() - datetime.timedelta(hours=5)
    records = {
        "build": make_failure(
            "t-build",
            function="reports.build.run",
            exception_type="requests.exceptions.Timeout",
            message="Deadline exceeded while fetching the ledger",
            queue="reports",
        ),
        "mail": make_failure(
            "t-mail",
            function="mail.send",
            exception_type="ValueError",
            message="bad address <x@y>",
            state=FailureState.RETRYING,
        ),
        "old": make_failure(
            "t-old",
            function="reports.archive",
            exception_type="KeyError",
            message="missing ledger key",
            queue="reports",
        ),
    }
    records["old"].last_seen = old
    records["old"].put()
    return records


# -- search and filters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {"build", "mail", "old"}),
        ("function=reports", {"build", "old"}),
        ("function=reports.build", {"build"}),
        ("function=reports.bu", set()),
        ("exception=Timeout", {"build"}),
        ("exception=requests.exceptions.Timeout", {"build"}),
        ("queue=reports", {"build", "old"}),
        ("state=retrying", {"mail"}),
        ("state=active", {"build", "mail", "old"}),
        ("q=ledger", {"build", "old"}),
        ("q=LEDGER+deadline", {"build"}),
        ("since=2h", {"build", "mail"}),
        ("until=2h", {"old"}),
        ("function=reports&q=ledger&since=1h&queue=reports&state=dead", {"build"}),
    ],
)
def test_failure_filters_combine_in_the_url_and_the_api(app, ndb_stub, query, expected):
    records = seed_failures()
    by_id = {record.id: name for name, record in records.items()}
    found = {by_id[record_id] for record_id in ids(app.get(f"{P}/api/failures?{query}"))}
    assert found == expected
    page = app.get(f"{P}/failures/list?{query}")
    assert page.text.count('<details class="failure" data-key=') == len(expected)


def test_failure_sorts_and_a_cursor_only_serve_their_own_filter(app, ndb_stub):
    records = seed_failures()
    records["mail"].attempts = 9
    records["mail"].put()
    newest = ids(app.get(f"{P}/api/failures?sort=newest"))
    assert newest[-1] == records["old"].id
    assert ids(app.get(f"{P}/api/failures?sort=oldest"))[0] == records["old"].id
    assert ids(app.get(f"{P}/api/failures?sort=attempts"))[0] == records["mail"].id
    first = app.get(f"{P}/api/failures?function=reports&limit=1").json
    assert first["filters"] == {"function": "reports"} and first["next_cursor"]
    again = app.get(f"{P}/api/failures?function=reports&limit=1&cursor={first['next_cursor']}")
    assert ids(again) == [records["old"].id]
    other = app.get(
        f"{P}/api/failures?function=mail&limit=1&cursor={first['next_cursor']}", expect_errors=True
    )
    assert other.status_int == 400


def test_filter_form_keeps_its_values_and_escapes_them(app, ndb_stub):
    seed_failures()
    page = app.get(f"{P}/failures/list", {"q": XSS, "function": XSS})
    assert_inert(page)
    form = page.forms[0]
    assert form["q"].value == XSS and form["function"].value == XSS
    form["q"] = "ledger"
    form["function"] = "reports"
    found = form.submit()
    assert (
        "q=ledger" in found.request.url
        and found.text.count('<details class="failure" data-key=') == 2
    )


def test_spillover_filters_by_function_prefix_queue_and_time(app, ndb_stub):
    old = spillover.now() - datetime.timedelta(days=2)
    make_spilled("s-build", function="reports.build")
    make_spilled("s-mail", function="mail.send", queue="reports")
    make_spilled("s-old", function="reports.archive", created=old)
    assert ids(app.get(f"{P}/api/spillover?function=reports&sort=newest")) == ["s-build", "s-old"]
    assert ids(app.get(f"{P}/api/spillover?queue=reports")) == ["s-mail"]
    assert ids(app.get(f"{P}/api/spillover?since=1d&sort=oldest")) == ["s-build", "s-mail"]
    refused = app.get(f"{P}/api/spillover?since=1d&sort=largest", expect_errors=True)
    assert refused.status_int == 400 and "time range" in refused.json["error"]


# -- everything a filter matches -----------------------------------------------------------


def test_dismiss_everything_a_filter_matches_after_a_counted_confirmation(app, ndb_stub):
    records = seed_failures()
    page = app.get(f"{P}/failures/list?function=reports")
    bulk = page.forms[len(page.forms) - 1]
    assert bulk.action == f"{P}/failures/bulk-matching" and bulk["function"].value == "reports"
    confirm = bulk.submit("action", value="dismiss")
    assert "Dismiss 2 failures with function reports?" in confirm.text
    assert failures.get(records["build"].id).state == FailureState.DEAD
    done = confirm.forms[0].submit()
    assert done.status_int == 303 and done.location.endswith("/failures/list?function=reports")
    assert "2 done, 0 failed" in done.follow().text
    states = {name: failures.get(record.id).state for name, record in records.items()}
    assert states == {"build": "dismissed", "old": "dismissed", "mail": "retrying"}
    (summary,) = [e for e in audit.recent()[0] if e.action == "bulk dismiss"]
    assert summary.target == 'failures?{"function": "reports"}' and "2 done" in summary.detail


def test_bulk_matching_through_the_api_with_a_json_filter(app, ndb_stub):
    pause("default")
    for number in range(3):
        make_spilled(f"m{number}", state=PayloadState.DEAD, function="jobs.resize")
    make_spilled("keep", state=PayloadState.DEAD, function="other.thing")
    headers = {"X-CSRF-Token": csrf_token(app)}
    result = app.post_json(
        f"{P}/api/spillover/bulk-matching",
        {"action": "retrigger", "state": "dead", "function": "jobs"},
        headers=headers,
    ).json
    assert sorted(result["done"]) == ["m0", "m1", "m2"] and result["errors"] == {}
    assert len(queued_tasks("default")) == 3
    assert spillover.get("keep").state == PayloadState.DEAD
    none = app.post_json(
        f"{P}/api/spillover/bulk-matching",
        {"action": "delete", "state": "dead", "function": "nothing.here"},
        headers=headers,
        expect_errors=True,
    )
    assert none.status_int == 404


# -- Post/Redirect/Get ---------------------------------------------------------------------


def test_every_html_action_redirects_with_a_one_time_message(app, ndb_stub):
    record = make_failure("prg")
    page = app.get(f"{P}/failures/list")
    dismiss = next(f for f in page.forms.values() if f.action.endswith("/dismiss"))
    answer = dismiss.submit()
    assert answer.status_int == 303
    assert answer.location == f"http://localhost{P}/failures/list"
    shown = answer.follow()
    assert f"Dismissed failure {record.id}." in shown.text
    assert f"Dismissed failure {record.id}." not in app.get(f"{P}/failures/list").text
    entries = [e.action for e in audit.recent()[0]]
    assert entries == ["dismiss"]  # the reload did not dismiss again


def test_a_forged_flash_cookie_is_ignored(app, ndb_stub):
    app.set_cookie("deferred_admin_flash", "PHNjcmlwdD4.AAAAAAAAAAAAAAAAAAAAAA")
    page = app.get(P)
    assert "<script>" not in page.text and 'class="notice ok flash"' not in page.text


def test_back_field_cannot_leave_the_dashboard(app, ndb_stub):
    record = make_failure("back")
    token = csrf_token(app)
    for back, expected in (
        ("https://evil.example/x", f"{P}/failures/{record.id}"),
        ("//evil.example/x", f"{P}/failures/{record.id}"),
        (f"{P}/../../elsewhere", f"{P}/failures/{record.id}"),
        (f"{P}/failures/list?state=dead", f"{P}/failures/list?state=dead"),
    ):
        answer = app.post(f"{P}/failures/{record.id}/dismiss", {"csrf_token": token, "back": back})
        assert answer.location == f"http://localhost{expected}", back


# -- task detail ---------------------------------------------------------------------------


def test_task_detail_shows_attempts_headers_and_the_envelope_without_unpickling(app, ndb_stub):
    pause("reports")
    with tracing.request_scope(tracing.from_environ({"PATH_INFO": "/checkout"})):
        inline = gae_deferred.defer(sample, XSS, _queue="reports", _countdown=3600)
        spilled = gae_deferred.defer(sample, os.urandom(150_000), _queue="reports", _countdown=3600)
    page = app.get(f"{P}/queues/reports")
    detail = page.click(inline.name)
    assert_inert(detail)
    assert "tests.dashboard.support.sample" in detail.text and "/checkout" in detail.text
    assert "traceparent" in detail.text and "inline:" in detail.text
    data = app.get(f"{P}/api/queues/reports/tasks/{inline.name}").json
    assert data["envelope"]["function"] == "tests.dashboard.support.sample"
    assert data["envelope"]["deferred_by"]["path"] == "/checkout"
    assert data["headers"]["traceparent"].startswith("00-")
    assert data["dispatch_count"] == 0 and data["first_attempt"] is None
    spilled_page = app.get(f"{P}/queues/reports/tasks/{spilled.name}")
    link = f'href="{P}/spillover/{spilled.payload_id}"'
    assert link in spilled_page.text and "spilled to Datastore" in spilled_page.text
    run = next(f for f in spilled_page.forms.values() if f.action.endswith("/run"))
    assert run.submit().status_int == 303
    delete = next(f for f in detail.forms.values() if f.action.endswith("/delete"))
    gone = delete.submit().forms[0].submit()
    assert gone.location.endswith(f"{P}/queues/reports")
    assert inline.name not in [t.name.rsplit("/", 1)[-1] for t in queued_tasks("reports")]
    missing = app.get(f"{P}/queues/reports/tasks/{inline.name}", expect_errors=True)
    assert missing.status_int == 404


# -- where a task came from ----------------------------------------------------------------


def test_failure_detail_says_which_request_deferred_it_with_a_logs_link(app, ndb_stub):
    record = make_failure("traced")
    record.meta = {
        **record.meta,
        "request": {"path": "/orders/7", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"},
    }
    record.put()
    # Local mode has no Cloud Logging: no dead link, the trace as the local log lines show it.
    local = app.get(f"{P}/failures/{record.id}")
    assert "console.cloud.google.com" not in local.text
    assert "[trace 4bf92f35]" in local.text
    gae_deferred.configure(local_mode=False, admin_hook=lambda environ: "ops@example.com")
    page = app.get(f"{P}/failures/{record.id}")
    assert "/orders/7" in page.text
    link = re.search(r'href="(https://console\.cloud\.google\.com/logs/query[^"]+)"', page.text)
    assert link, "no Cloud Logging link"
    assert "4bf92f3577b34da6a3ce929d0e0e4736" in link.group(1)
    assert "project=test-project" in link.group(1)
    origin = app.get(f"{P}/api/failures/{record.id}").json["deferred_by"]
    assert origin["path"] == "/orders/7" and origin["logs_url"] == link.group(1).replace(
        "&amp;", "&"
    )
    untraced = make_failure("untraced")
    assert "deferred outside a request" in app.get(f"{P}/failures/{untraced.id}").text


def test_bulk_ids_travel_in_the_form_body_only(app, ndb_stub):
    make_spilled("q1", state=PayloadState.DEAD)
    token = csrf_token(app)
    smuggled = app.post(
        f"{P}/spillover/bulk?action=delete&ids=q1&confirm=yes",
        {"csrf_token": token},
        expect_errors=True,
    )
    assert smuggled.status_int == 400
    assert spillover.get("q1") is not None
    keys = ndb.get_multi([spillover.payload_key("q1")])
    assert keys[0] is not None


def test_bulk_matching_acts_on_the_confirmed_count_or_asks_again(app, ndb_stub):
    """Finding: the page confirmed "Dismiss 1 failures", 40 more matched by the time it was
    confirmed, and 41 were dismissed. Now nothing is done and the question comes back."""
    make_failure("only", function="reports.build")
    page = app.get(f"{P}/failures/list?function=reports")
    confirm = page.forms[len(page.forms) - 1].submit("action", value="dismiss")
    assert "Dismiss 1 failures with function reports?" in confirm.text
    assert confirm.forms[0]["expected"].value == "1"
    for number in range(40):
        make_failure(f"late-{number}", function="reports.build")
    again = confirm.forms[0].submit()
    assert again.status_int == 200
    assert (
        "The number of matching records changed from 1 to 41: nothing was done yet. "
        "Dismiss 41 failures with function reports?" in again.text
    )
    assert [r for r in failures.DeferredFailure.query().fetch() if r.state == "dismissed"] == []
    assert again.forms[0]["expected"].value == "41"
    done = again.forms[0].submit()
    assert done.status_int == 303 and "41 done, 0 failed" in done.follow().text
    dismissed = [r for r in failures.DeferredFailure.query().fetch() if r.state == "dismissed"]
    assert len(dismissed) == 41


def test_bulk_matching_api_with_an_expected_count_is_409_when_it_changed(app, ndb_stub):
    for number in range(3):
        make_failure(f"api-{number}", function="jobs.resize")
    headers = {"X-CSRF-Token": csrf_token(app)}
    url = f"{P}/api/failures/bulk-matching"
    wanted = {"action": "dismiss", "function": "jobs"}
    changed = app.post_json(url, {**wanted, "expected": 2}, headers=headers, status=409)
    assert changed.json["error"] == "3 records match now, not the 2 confirmed: nothing was done"
    bad = app.post_json(url, {**wanted, "expected": "2x"}, headers=headers, status=400)
    assert bad.json["error"] == "expected must be a number of records, not '2x'"
    assert all(r.state != "dismissed" for r in failures.DeferredFailure.query().fetch())
    done = app.post_json(url, {**wanted, "expected": 3}, headers=headers).json
    assert len(done["done"]) == 3
