"""What the pages show: labelled numbers, one failure colour, empty charts, the envelope
header formatted once for every page, audit targets as links, Cloud Tasks responses."""

from __future__ import annotations

import re

from google.cloud import tasks_v2
from google.rpc import status_pb2

from gae_deferred import admin, audit, metrics
from gae_deferred.webapp2 import _templates
from tests.dashboard.support import P, make_failure, make_spilled


def test_overview_labels_runs_apart_from_failure_records_in_one_failure_colour(app):
    make_failure("t-1")
    for _ in range(3):
        metrics.observe("test_admin.sample", "default", 0.01, ok=False, retried=True)
    metrics.flush()
    page = app.get(P).text
    assert "3 failed runs</span> (every attempt counts)" in page
    assert "Failure records" in page and "One record per failing task" in page
    # Failures per hour and failed runs share the failure colour (class "failed").
    assert '<svg class="bars failed"' in page
    assert re.search(r'<rect class="failed"', page)


def test_an_empty_chart_says_so_without_a_peak(app):
    page = app.get(P).text
    assert "peak" not in page
    assert "nothing ran" in page and "no failures" in page


def test_one_header_formatter_for_failure_spillover_and_task_pages(app):
    failure = make_failure("t-h", args_preview="")
    failure.meta = {
        **failure.meta,
        "request": {"path": "/orders/1", "trace_id": "ab" * 16},
        "created_ms": 1_700_000_000_123,
    }
    failure.put()
    data = app.get(f"{P}/api/failures/{failure.id}").json
    rows = {row["key"]: row for row in data["header"]}
    assert rows["created_ms"]["text"] == "2023-11-14 22:13:20.123 UTC"
    assert re.fullmatch(r"\d+ B", rows["raw_bytes"]["text"])  # small: no "(59 bytes)" echo
    assert rows["request"]["text"] == "/orders/1, trace " + "ab" * 16
    assert "the current signing key" in rows["kid"]["text"]
    assert "args" not in rows  # empty: no row
    page = app.get(f"{P}/failures/{failure.id}").text
    assert "{'path'" not in page and "1700000000123" not in page
    assert "<dt>Arguments</dt>" not in page
    spilled = make_spilled("h1", size=5000)
    detail = app.get(f"{P}/spillover/h1").text
    assert "id of the key that signed this envelope" in detail
    assert re.search(r"Pickled size</th><td><code>[0-9.]+ KiB \([0-9,]+ bytes\)", detail)
    assert f'href="{P}/queues/default/tasks/{spilled.task_name}"' in detail


def test_audit_targets_are_links(app):
    audit.record("ops", "dismiss", "failure/f-1", "")
    audit.record("ops", "delete", "failure/a/b?c", "")
    audit.record("ops", "pause", "queue/reports", "")
    audit.record("ops", "run", "task/reports/t-9", "")
    audit.record("ops", "bulk dismiss", 'failures?{"function": "x", "state": "dead"}', "")
    audit.record("ops", "sweep", "sweeper", "")
    page = app.get(f"{P}/audit").text
    assert f'href="{P}/failures/f-1"' in page
    assert f'href="{P}/failures/{admin.url_id("a/b?c")}"' in page
    assert f'href="{P}/queues/reports"' in page
    assert f'href="{P}/queues/reports/tasks/t-9"' in page
    assert f'href="{P}/failures/list?function=x&amp;state=dead"' in page
    assert "failures where function=x, state=dead" in page
    assert '<time datetime="' in page and ' UTC">' in page  # exact time on hover


def test_last_response_shows_what_cloud_tasks_said_not_its_grpc_code():
    task = tasks_v2.Task(
        name="projects/p/locations/l/queues/reports/tasks/t-1",
        app_engine_http_request=tasks_v2.AppEngineHttpRequest(
            relative_uri="/_ah/queue/deferred/reports.build"
        ),
        last_attempt=tasks_v2.Attempt(
            response_status=status_pb2.Status(code=13, message="HTTP 500")
        ),
    )
    item = admin.task_json(task)
    assert item["last_response"]["text"] == "HTTP 500"
    assert item["function"] == "reports.build"
    silent = tasks_v2.Task(
        name="projects/p/locations/l/queues/q/tasks/t-2",
        last_attempt=tasks_v2.Attempt(response_status=status_pb2.Status(code=4)),
    )
    assert admin.task_json(silent)["last_response"]["text"] == "DEADLINE_EXCEEDED"
    html = _templates.render(
        "queue_tasks.html",
        {
            "queue": "reports",
            "state": "RUNNING",
            "items": [item],
            "next_cursor": None,
            "title": "Queue reports",
            "admin_user": None,
            "can_act": True,
            "local_mode": False,
            "csrf_token": "x",
            "refresh": 0,
            "page_url": lambda **changes: "",
            "paging": lambda *args: {
                "start": 1,
                "end": 1,
                "of": "1",
                "previous": None,
                "next": None,
                "first": None,
            },
            "request_path": f"{P}/queues/reports",
            "here": f"{P}/queues/reports",
            "flash": None,
            "status": None,
        },
    )
    assert ">HTTP 500<" in html and "13 HTTP 500" not in html
    assert "reports.build" in html


def test_lists_say_more_than_when_their_count_is_capped(app, monkeypatch):
    import importlib

    filters = importlib.import_module("gae_deferred.admin.filters")
    overview = importlib.import_module("gae_deferred.admin.overview")
    monkeypatch.setattr(filters, "LIST_COUNT_CAP", 2)
    monkeypatch.setattr(overview, "LIST_COUNT_CAP", 2)
    for number in range(4):
        make_failure(f"t-cap{number}")
        audit.record("ops", "dismiss", f"failure/f-{number}", "")
    page = app.get(f"{P}/failures/list", {"limit": 3}).text
    assert "Showing 1 to 3 of more than 2" in page
    data = app.get(f"{P}/api/failures", {"limit": 3}).json
    assert (data["total"], data["total_capped"]) == (2, True)
    assert "of more than 2" in app.get(f"{P}/audit").text
    monkeypatch.setattr(filters, "LIST_COUNT_CAP", 1000)
    assert "Showing 1 to 3 of 4" in app.get(f"{P}/failures/list", {"limit": 3}).text
    # Groups are not counted (a count per group is already shown): the page's own numbers
    # ("of 1", or "of more than 1" where the backend cannot tell it was the last page).
    assert "Showing 1 to 1 of " in app.get(f"{P}/failures").text


def test_flash_messages_link_the_records_they_name(app):
    record = make_failure("t-flash", record_id="a/b?c")
    page = app.get(f"{P}/failures/{admin.url_id(record.id)}")
    dismiss = next(f for f in page.forms.values() if f.action.endswith("/dismiss"))
    shown = dismiss.submit().follow()
    flash = re.search(r'<p class="notice ok flash"[^>]*>(.*?)</p>', shown.text).group(1)
    assert "Dismissed failure a/b?c." in flash
    assert f'<a href="{P}/failures/{admin.url_id("a/b?c")}">failure a/b?c</a>' in flash


def test_a_retrying_failure_says_when_its_next_attempt_is(app):
    import gae_deferred
    from gae_deferred import FailureState
    from tests.dashboard.support import pause, sample

    pause("default")
    task = gae_deferred.defer(sample, 1, _countdown=600)
    record = make_failure(task.name, state=FailureState.RETRYING)
    data = app.get(f"{P}/api/failures/{record.id}").json
    assert data["next_attempt"] is not None
    page = app.get(f"{P}/failures/{record.id}").text
    assert re.search(r"<dt>Next attempt</dt><dd><time [^>]*>in 9m \d+s</time>", page)
    dead = make_failure("t-gone", state=FailureState.DEAD)
    assert app.get(f"{P}/api/failures/{dead.id}").json["next_attempt"] is None


def test_retrying_failures_on_a_list_show_their_estimated_next_attempt(app):
    import datetime

    from gae_deferred import FailureState
    from gae_deferred.queue_config import RetryParameters

    # Cloud Tasks' documented schedule for 10 s, 300 s, 3 doublings.
    retry = RetryParameters(min_backoff_seconds=10, max_backoff_seconds=300, max_doublings=3)
    delays = [admin.retry_delay(retry, attempts) for attempts in range(1, 10)]
    assert delays == [10, 20, 40, 80, 160, 240, 300, 300, 300]
    record = make_failure("t-est", state=FailureState.RETRYING, queue="reports")
    record.attempts = 3
    record.put()
    dead = make_failure("t-dead", state=FailureState.DEAD, queue="reports")
    items = app.get(f"{P}/api/failures").json["items"]
    estimates = {item["id"]: item["next_attempt_estimate"] for item in items}
    last_seen = datetime.datetime.fromisoformat(
        next(item["last_seen"] for item in items if item["id"] == record.id)
    )
    # reports: min 10 s, 3 doublings -> the third retry waits 40 s.
    assert estimates[record.id] == (last_seen + datetime.timedelta(seconds=40)).isoformat()
    assert estimates[dead.id] is None
    page = app.get(f"{P}/failures/list").text
    assert re.search(r"next ≈ <time [^>]*>in \d+s</time>", page)
