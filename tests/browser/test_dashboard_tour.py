"""Every dashboard page as an admin and as a viewer, at 1280x800 and 390x844: action buttons
and every column inside the screen, readable chart text, no button for viewers. Screenshots go
to test-output/screenshots/<role>-<page>-<width>.png for a person to look at.
"""

from __future__ import annotations

import os

import gae_deferred
from gae_deferred import audit
from tests.browser import browser_tasks
from tests.fixtures import SCREENSHOTS, failure_record, wait_for
from tests.stack_support import datastore

WIDTHS = ((1280, 800), (390, 844))
#: Pages without an action even for admins.
READ_ONLY = ("metrics", "metrics-function", "queues", "audit", "refused")
#: What must be fully on screen: buttons, the last cell of each row (Actions, Detail), inputs.
ON_SCREEN = "main button, main a.button, main tbody td:last-child, main input:not([type=hidden])"


def _outside(page, width: int) -> list[str]:
    """Visible elements of ON_SCREEN that stick out of the viewport sideways."""
    return page.evaluate(
        """([selector, width]) => [...document.querySelectorAll(selector)]
            .filter(el => el.offsetParent !== null && !el.closest('details:not([open])'))
            .map(el => [el, el.getBoundingClientRect()])
            .filter(([el, box]) => box.width > 0 && (box.left < -0.5 || box.right > width + 0.5))
            .map(([el, box]) => `${el.tagName} ${el.textContent.trim().slice(0, 30)} `
                + `${box.left}-${box.right}`)""",
        [ON_SCREEN, width],
    )


def _seed(live, tmp_path) -> dict[str, str]:
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    gae_deferred.defer(browser_tasks.fails_with, "tour failure")
    queued = gae_deferred.defer(
        browser_tasks.touch, str(run_dir), "tour", _queue="reports", _countdown=3600
    )
    spilled = gae_deferred.defer(
        browser_tasks.touch, str(run_dir), "tour-spilled", os.urandom(150_000), _countdown=3600
    )
    failure = failure_record("f-" + "7" * 32, "billing.invoices.render", "ledger 7 is locked " * 8)
    with datastore():
        audit.record(
            "a-very-long-operator-name@example.com",
            "bulk dismiss",
            'failures?{"function": "billing.invoices.render.with.a.long.dotted.name"}',
            "failures with function billing.invoices.render: 3 done, 0 failed (at most 1000)",
        )
    return {
        "overview": "",
        "metrics": "/metrics?window=1h",
        "metrics-function": "/metrics?function=tests.browser.browser_tasks.fails_with",
        "spillover": "/spillover",
        "spillover-detail": f"/spillover/{spilled.payload_id}",
        "failures": "/failures",
        "failure-list": "/failures/list",
        "failure-detail": f"/failures/{failure}",
        "queues": "/queues",
        "queue-tasks": "/queues/reports",
        "task-detail": f"/queues/reports/tasks/{queued.name}",
        "audit": "/audit",
        "refused": "/refused",
    }


def test_every_page_as_admin_and_viewer_at_both_widths(browser, live, tmp_path):
    gae_deferred.cloud_tasks.pause_queue("reports")
    try:
        pages = _seed(live, tmp_path)
        metrics_url = f"{live.dashboard_url}/metrics?window=1h"
        seen = browser.new_page()
        wait_for(
            lambda: seen.goto(metrics_url) and "browser_tasks.fails_with" in seen.content(),
            "the failed run's metrics",
        )
        seen.close()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for role in ("admin", "viewer"):
            context = browser.new_context(extra_http_headers={"X-Deferred-Role": role})
            page = context.new_page()
            try:
                for name, path in pages.items():
                    page.set_viewport_size({"width": 1280, "height": 800})
                    response = page.goto(live.dashboard_url + path)
                    assert response.status == 200, (role, name)
                    for summary in page.locator("details.failure > summary").all()[:1]:
                        summary.click()  # the first failure open: its buttons are checked too
                    posts = page.locator("main form[method=post]").count()
                    if role == "viewer":
                        assert posts == 0, name
                    elif name not in READ_ONLY:
                        assert posts > 0, name
                    # One load, both widths: the layout follows the viewport (CSS only).
                    for width, height in WIDTHS:
                        page.set_viewport_size({"width": width, "height": height})
                        assert _outside(page, width) == [], (role, name, width)
                        scroll = page.evaluate("document.documentElement.scrollWidth")
                        assert scroll <= width, (role, name, width, scroll)
                        page.screenshot(
                            path=str(SCREENSHOTS / f"{role}-{name}-{width}.png"), full_page=True
                        )
                        if name == "overview":
                            sizes = page.evaluate(
                                "[...document.querySelectorAll('.chart-labels span')]"
                                ".map(el => parseFloat(getComputedStyle(el).fontSize))"
                            )
                            assert sizes and min(sizes) >= 11, (width, sizes)
            finally:
                context.close()
    finally:
        gae_deferred.cloud_tasks.resume_queue("reports")


def test_live_refresh_follows_navigation_and_keeps_rows_open(page, live):
    first, second = "f-" + "a" * 32, "f-" + "b" * 32
    failure_record(first, "live.refresh.one", "the first failure")
    page.goto(f"{live.dashboard_url}/audit?refresh=5")
    page.click("header nav >> text=Failures")
    page.click("a:has-text('search every failure')")
    # The choice followed the user: no ?refresh= in this URL.
    assert "refresh" not in page.url
    assert page.locator("body").get_attribute("data-refresh") == "5"
    page.evaluate("window.stillThisPage = true")
    page.locator(f"details[data-key='{first}'] > summary").click()
    failure_record(second, "live.refresh.two", "the second failure")
    page.wait_for_selector(f"details[data-key='{second}']", timeout=20_000)
    assert page.evaluate("window.stillThisPage") is True  # swapped in, not reloaded
    assert page.locator(f"details[data-key='{first}']").evaluate("d => d.open") is True
    page.goto(f"{live.dashboard_url}/failures/list?refresh=0")
    assert page.locator("body").get_attribute("data-refresh") == "0"
