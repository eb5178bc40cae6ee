"""The Jobs page in headless chromium on the real local stack: an iterate() job runs in the
stack's app; the test pauses, resumes and cancels it from the page, and reads a finished job
with a skipped entity and its finalize outcome.

Screenshots (1280 and 390 px wide) go to test-output/screenshots/ like the other scenarios.
"""

from __future__ import annotations

import uuid

from google.cloud import ndb

import gae_deferred
from gae_deferred import iteration
from tests.browser.browser_jobs import BrowserItem, BrowserJobDone, record_done, slow_touch
from tests.fixtures import shoot, wait_for
from tests.stack_support import datastore


def _items(count: int, broken: frozenset[int] = frozenset()) -> tuple[str, list[ndb.Key]]:
    run = uuid.uuid4().hex
    with datastore():
        keys = ndb.put_multi(
            [BrowserItem(run=run, broken=index in broken) for index in range(count)]
        )
    return run, keys


def _job(job_id: str) -> iteration.DeferredJob:
    with datastore():
        return iteration.DeferredJob.get_by_id(job_id)


def _processed(job_id: str) -> int:
    with datastore():
        return sum(shard.processed for shard in iteration.job_shards(job_id))


def test_pause_resume_and_cancel_a_running_job_from_the_jobs_page(page, live):
    run, _ = _items(1200)  # about 15 s of work: the test ends it long before that
    with datastore():
        job = gae_deferred.iterate(
            BrowserItem.query(BrowserItem.run == run),
            slow_touch,
            shards=4,
            batch_size=5,
            time_budget=1,
            name="browser backfill",
        )
    wait_for(lambda: _processed(job.id) > 0, "the job's first batches", timeout=60)
    page.goto(f"{live.dashboard_url}/jobs")
    row = page.locator(f"tr[data-job='{job.id}']")
    assert row.locator("td").nth(1).inner_text() == "running"
    assert "browser backfill" in row.inner_text()
    shoot(page, "jobs-running")
    for width, height in ((1280, 800), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        for label in ("Pause", "Cancel"):
            box = row.locator("button", has_text=label).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (
                f"{label} is off screen at {width} px: {box}"
            )
        # Every column stays on screen: the last (Finalize) too, as a labelled card on a phone.
        box = row.locator("td").last.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (
            f"the Finalize column is off screen at {width} px: {box}"
        )
    page.set_viewport_size({"width": 1280, "height": 800})

    row.locator("button", has_text="Pause").click()
    assert "pause done" in page.locator(".flash").inner_text()
    assert _job(job.id).state == "paused"

    def stopped() -> bool:
        before = _processed(job.id)
        page.wait_for_timeout(1500)
        return _processed(job.id) == before

    wait_for(stopped, "the shards to stop after their batch")
    paused_at = _processed(job.id)
    assert paused_at < 1200
    page.goto(f"{live.dashboard_url}/jobs/{job.id}")
    assert page.locator("#job-state").inner_text() == "paused"
    assert page.locator("table.shards tbody tr").count() == 4

    page.locator("button", has_text="Resume").click()
    assert "resume done" in page.locator(".flash").inner_text()
    wait_for(lambda: _processed(job.id) > paused_at, "the resumed shards", timeout=60)

    page.locator("button", has_text="Cancel").click()
    assert "Cancel job" in page.content()
    page.locator("form.confirm button[type=submit]").click()
    assert _job(job.id).state == "cancelled"
    page.goto(f"{live.dashboard_url}/jobs/{job.id}")
    assert page.locator("#job-state").inner_text() == "cancelled"
    assert page.locator(".toolbar button").count() == 0
    shoot(page, "job-cancelled")

    page.goto(f"{live.dashboard_url}/audit")
    assert page.locator("tr", has_text=f"job/{job.id}").count() == 3


def test_a_finished_job_shows_its_skipped_entity_and_finalize(page, live):
    run, keys = _items(30, broken=frozenset({7}))
    with datastore():
        job = gae_deferred.iterate(
            BrowserItem.query(BrowserItem.run == run),
            slow_touch,
            shards=2,
            batch_size=10,
            finalize=record_done,
            name="finishes",
        )
    wait_for(lambda: _job(job.id).state == "done", "the job to finish", timeout=60)
    with datastore():
        done = BrowserJobDone.get_by_id(job.id)
    assert (done.processed, done.failed) == (29, 1)
    page.goto(f"{live.dashboard_url}/jobs")
    row = page.locator(f"tr[data-job='{job.id}']")
    cells = row.locator("td")
    assert cells.nth(1).inner_text() == "done"
    assert cells.nth(3).inner_text().startswith("29")
    assert cells.nth(9).inner_text() == "ok"
    cells.nth(4).locator("a").click()
    failed = page.locator("table.failed-entities tbody tr")
    assert failed.count() == 1
    assert f"BrowserItem {keys[7].id()!r}" in failed.inner_text()
    failed.locator("summary").click()
    assert "cannot be migrated" in failed.locator("pre.traceback").inner_text()
    shoot(page, "job-done")
