"""The dashboard's newer pages in headless chromium on the real local stack: metrics, task
detail, search with "everything this filter matches", and records that hostile input created.

Screenshots (1280 and 390 px wide) go to test-output/screenshots/ like the other scenarios.
"""

from __future__ import annotations

import datetime

import requests

import gae_deferred
from gae_deferred import FailureState, admin, envelope, failures, spillover, tracing
from tests.browser import browser_tasks
from tests.fixtures import failure_record, shoot, wait_for
from tests.stack_support import datastore


def test_metrics_page_lists_functions_and_charts_one(page, live, tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    for number in range(6):
        gae_deferred.defer(browser_tasks.pause_for, str(run_dir), f"m{number}", 20)
    gae_deferred.defer(browser_tasks.fails_with, "metrics failure")
    wait_for(lambda: len(list(run_dir.iterdir())) == 6, "the six tasks to run")

    def listed() -> bool:
        page.goto(f"{live.dashboard_url}/metrics?window=1h")
        row = page.locator("tr", has_text="browser_tasks.pause_for")
        return row.count() == 1 and row.locator("td.num").first.inner_text() == "6"

    wait_for(listed, "the metrics flush of the app process")
    assert page.locator("tr", has_text="browser_tasks.fails_with").count() == 1
    shoot(page, "metrics")
    page.click("table.metrics th a:has-text('Failures')")  # sort by failures
    rows = page.locator("table.metrics tbody tr")
    counts = [int(rows.nth(i).locator("td.num").nth(1).inner_text()) for i in range(rows.count())]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0
    failed = page.locator("tr", has_text="browser_tasks.fails_with").locator("td.num").nth(1)
    assert failed.inner_text() == "1"
    page.click("a:has-text('browser_tasks.pause_for')")
    assert page.locator("svg.runs").count() == 2
    assert "6" in page.locator("tr.current").inner_text()
    shoot(page, "metrics-function")
    page.goto(live.dashboard_url)
    assert page.locator("svg.runs").count() == 1
    shoot(page, "overview-with-runs")


def test_task_detail_shows_where_it_came_from_and_runs_it(page, live, tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    gae_deferred.cloud_tasks.pause_queue("reports")
    request = tracing.from_environ(
        {
            "PATH_INFO": "/orders/42/checkout",
            "HTTP_TRACEPARENT": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        }
    )
    with tracing.request_scope(request):
        task = gae_deferred.defer(
            browser_tasks.touch, str(run_dir), "detail", _queue="reports", _countdown=3600
        )
    try:
        page.goto(f"{live.dashboard_url}/queues/reports")
        page.click(f"a:has-text('{task.name}')")
        facts = page.locator("dl.facts").last.inner_text()
        assert "browser_tasks.touch" in facts and "/orders/42/checkout" in facts
        assert "4bf92f3577b34da6a3ce929d0e0e4736" in facts
        # Local mode: no dead Cloud Logging link, the trace as the stack's log lines show it.
        assert page.locator("a:has-text('Cloud Logging')").count() == 0
        assert "[trace 4bf92f35]" in facts
        shoot(page, "task-detail")
        page.click("button:has-text('Run now')")
        # Back to the queue: a task that ran is gone, its own page would be a 404.
        assert "dispatched now" in page.locator(".flash").inner_text()
        assert page.url.endswith("/queues/reports")
    finally:
        gae_deferred.cloud_tasks.resume_queue("reports")
    wait_for(lambda: (run_dir / "detail").exists(), "the task to run")


def test_search_then_dismiss_everything_it_matches(page, live):
    for number in range(3):
        failure_record(f"f-{number:032x}", "billing.invoices.render", f"ledger {number} is locked")
    keep = failure_record("f-" + "e" * 32, "billing.refunds.issue", "ledger 9 is locked")
    page.goto(f"{live.dashboard_url}/failures/list")
    page.fill("input[name=function]", "billing.invoices")
    page.fill("input[name=q]", "Locked ledger")
    page.click("button:has-text('Search')")
    assert "function=billing.invoices" in page.url and "q=Locked+ledger" in page.url
    assert page.locator("details.failure").count() == 3
    shoot(page, "failure-search")
    page.click("button:has-text('Dismiss all')")
    question = page.locator(".question").inner_text()
    assert question.startswith("Dismiss 3 failures with function billing.invoices")
    shoot(page, "confirm-matching")
    page.click("button:has-text('Dismiss 3 failures')")
    assert "3 done, 0 failed" in page.locator(".flash").inner_text()
    assert "q=Locked+ledger" in page.url
    page.reload()
    assert page.locator(".flash").count() == 0
    with datastore():
        assert failures.get(keep).state == FailureState.PERMANENT
        assert {failures.get(f"f-{n:032x}").state for n in range(3)} == {"dismissed"}


HOSTILE = ["../queues/reports/pause?y=", "../../queues/default/purge?confirm=yes&", "a/b?c"]


def test_records_hostile_input_created_are_dismissed_and_deleted_by_their_buttons(page, live):
    started = datetime.datetime.now(datetime.UTC)
    for record_id in HOSTILE:
        failure_record(record_id, "legacy.import", f"old record {record_id}", queue="reports")
    with datastore():
        payload_id = "../spillover/bulk?x="
        record, chunks = spillover.build_record(
            payload_id,
            envelope.serialize(browser_tasks.touch, "/nonexistent", "x"),
            {"function": "legacy.import"},
            queue="reports",
            task_name="old-task",
            eta=datetime.datetime.now(datetime.UTC),
            task={"url": "/_ah/queue/deferred"},
        )
        spillover.write_many([(record, chunks)])
    page.goto(f"{live.dashboard_url}/failures/list?function=legacy")
    assert page.locator("details.failure").count() == len(HOSTILE)
    for record_id in HOSTILE:
        page.goto(f"{live.dashboard_url}/failures/list?function=legacy")
        summary = page.locator("details.failure", has_text=f"old record {record_id}")
        summary.locator("summary").click()
        summary.locator("button:has-text('Dismiss')").click()
        assert "Dismissed failure" in page.locator(".flash").inner_text()
    shoot(page, "hostile-ids")
    for queue in ("reports", "default"):
        assert admin_state(live, queue) == "running"
    for record_id in HOSTILE:
        page.goto(f"{live.dashboard_url}/failures/{admin.url_id(record_id)}")
        assert page.locator("h1").inner_text() == f"Failure {record_id}"
        page.click("button:has-text('Delete')")
        page.click("button:has-text('Delete 1 failure')")
        assert "Deleted failure" in page.locator(".flash").inner_text()
    page.goto(f"{live.dashboard_url}/spillover?function=legacy")
    page.click("a:has-text('legacy.import')")
    page.click("button:has-text('Delete')")
    page.click("button:has-text('Delete 1 spilled payload')")
    with datastore():
        assert [failures.get(record_id) for record_id in HOSTILE] == [None] * len(HOSTILE)
        assert spillover.get(payload_id) is None
    audit = requests.get(f"{live.dashboard_url}/api/audit", timeout=30).json()["items"]
    done = [
        (e["action"], e["target"])
        for e in audit
        if datetime.datetime.fromisoformat(e["when"]) >= started
    ]
    assert {action for action, _ in done} == {"dismiss", "delete"}, done


def admin_state(live, queue: str) -> str:
    data = requests.get(f"{live.dashboard_url}/api/queues", timeout=30).json()
    (found,) = [item for item in data["items"] if item["name"] == queue]
    return found["state"].lower()


def test_new_screenshots_exist():
    """Run last in this file: the scenarios above saved every new page at both widths."""
    from test_dashboard_browser import SCREENSHOTS

    names = ("metrics", "metrics-function", "task-detail", "failure-search", "hostile-ids")
    missing = [
        f"{name}-{width}"
        for name in (*names, "confirm-matching", "overview-with-runs")
        for width in (1280, 390)
        if not (SCREENSHOTS / f"{name}-{width}.png").exists()
    ]
    assert missing == []
