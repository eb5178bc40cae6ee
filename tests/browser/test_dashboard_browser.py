"""The dashboard in headless chromium against the real local stack (emulators + gunicorn).

Each scenario clicks through the pages like an operator would, waits for the task to really
run in the app, and saves screenshots (1280x800 and 390 px wide) under
test-output/screenshots/ for a human to look at.
"""

from __future__ import annotations

import os
import pathlib

import gae_deferred
from tests.browser import browser_tasks
from tests.fixtures import SCREENSHOTS, shoot, wait_for

P = "/_ah/deferred-admin"


def test_spilled_payload_is_listed_and_retrigger_runs_it(page, live, tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    # Far in the future: the task will not run unless someone retriggers it.
    task = gae_deferred.defer(
        browser_tasks.touch, str(run_dir), "spilled", os.urandom(150_000), _countdown=3600
    )
    assert task.spilled
    page.goto(live.dashboard_url)
    assert page.locator(".badge.local").inner_text() == "local mode"
    shoot(page, "overview")
    page.click("nav >> text=Spillover")
    row = page.locator("tr", has_text=task.name)
    assert "browser_tasks.touch" in row.inner_text()
    shoot(page, "spillover")
    row.locator("a").first.click()
    assert "Envelope header" in page.content()
    shoot(page, "spillover-detail")
    page.click("button:has-text('Retrigger')")
    assert "Retriggered spilled payload" in page.locator(".notice").inner_text()
    wait_for(lambda: (run_dir / "spilled").exists(), "the retriggered task to run")
    # A successful run deletes the record: the list no longer shows it.
    page.goto(f"{live.dashboard_url}/spillover")
    wait_for(
        lambda: page.reload() is not None and task.name not in page.content(),
        "the record to go",
        10,
    )
    page.goto(f"{live.dashboard_url}/audit")
    assert "retrigger" in page.locator("table").inner_text()
    shoot(page, "audit")


def test_failure_group_retry_resolves_it(page, live, tmp_path):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    gae_deferred.defer(browser_tasks.broken_until_fixed, str(run_dir))
    gae_deferred.defer(browser_tasks.broken_until_fixed, str(run_dir))
    page.goto(f"{live.dashboard_url}/failures")

    def group_listed() -> bool:
        page.reload()
        row = page.locator("tr", has_text="broken_until_fixed")
        return row.count() == 1 and row.locator("td.num").inner_text() == "2"

    wait_for(group_listed, "both failures to be recorded")
    shoot(page, "failures")
    page.click("tr:has-text('broken_until_fixed') >> text=Show")
    page.locator("details.failure summary").first.click()
    # The exception message carries a <script> tag: it must show as text.
    assert (
        '<script>alert("x")</script>'
        in page.locator("details.failure pre.message").first.inner_text()
    )
    shoot(page, "failure-list")
    (run_dir / "fixed").write_text("yes")
    page.goto(f"{live.dashboard_url}/failures")
    page.click("tr:has-text('broken_until_fixed') >> button:has-text('Retry group')")
    assert "Retry 2 failures where" in page.locator(".question").inner_text()
    shoot(page, "confirm")
    page.click("form.confirm button:has-text('Retry 2 failures')")
    assert "Retried 2 failures" in page.locator(".notice").inner_text()
    wait_for(lambda: (run_dir / "repaired").exists(), "a retried task to run")

    def resolved() -> bool:
        page.goto(f"{live.dashboard_url}/failures?view=resolved")
        row = page.locator("tr", has_text="broken_until_fixed")
        return row.count() == 1 and row.locator("td.num").inner_text() == "2"

    wait_for(resolved, "both failures to be resolved")


def test_pause_and_resume_a_queue(page, live):
    page.goto(f"{live.dashboard_url}/queues")
    shoot(page, "queues")
    page.click("a:has-text('reports')")
    page.click("button:has-text('Pause queue')")
    # Post/Redirect/Get: back on the queue's page, with the result shown once.
    assert page.url.endswith("/queues/reports")
    assert "pause done" in page.locator(".flash").inner_text()
    assert page.locator(".toolbar .state").inner_text() == "paused"
    gae_deferred.defer(browser_tasks.touch, "/nonexistent", "queued", _queue="reports")
    page.reload()
    assert page.locator(".flash").count() == 0
    assert page.locator("tbody tr").count() == 1
    shoot(page, "queue-tasks")
    page.click("button:has-text('Resume queue')")
    assert page.locator(".toolbar .state").inner_text() == "running"


def test_pages_work_without_javascript(browser, live):
    context = browser.new_context(java_script_enabled=False)
    tab = context.new_page()
    try:
        for path in ("", "/spillover", "/failures", "/failures/list", "/queues", "/audit"):
            response = tab.goto(live.dashboard_url + path)
            assert response.status == 200, path
        tab.goto(f"{live.dashboard_url}/queues/default")
        tab.click("button:has-text('Purge queue')")
        assert "Purge queue default?" in tab.content()
        tab.click("button:has-text('Purge queue default')")
        assert "purge done" in tab.content()
    finally:
        context.close()


def test_screenshots_exist_for_every_page():
    """Run last in this file: the scenarios above saved every page at both widths."""
    names = (
        "overview",
        "spillover",
        "spillover-detail",
        "failures",
        "failure-list",
        "queues",
        "queue-tasks",
        "audit",
        "confirm",
    )
    missing = [
        name
        for name in names
        for width in (1280, 390)
        if not pathlib.Path(SCREENSHOTS / f"{name}-{width}.png").exists()
    ]
    assert missing == []
