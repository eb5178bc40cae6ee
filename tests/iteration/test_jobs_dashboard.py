"""The dashboard's Jobs page and its JSON twins (WebTest, on the Datastore emulator)."""

from __future__ import annotations

import contextlib

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import audit, iteration
from gae_deferred.testing import capture_tasks
from gae_deferred.webapp2 import deferred_middleware, deferred_routes
from tests import stack_support
from tests.dashboard.support import LOOPBACK, XSS, P, csrf_token, form_token
from tests.iteration import jobs_support
from tests.iteration.jobs_support import Item, make_items


@pytest.fixture
def app(ndb_emulator):
    gae_deferred.configure(local_mode=True)
    wsgi = deferred_middleware(webapp2.WSGIApplication(deferred_routes()))
    return webtest.TestApp(wsgi, extra_environ=LOOPBACK)


@pytest.fixture
def queue(ndb_emulator):
    with capture_tasks() as captured:
        yield captured


def _started(queue, count=60, **options):
    """A job over ``count`` items with its plan and one task per shard run."""
    keys = make_items(count, poison=options.pop("poison", frozenset()))
    options.setdefault("shards", 3)
    options.setdefault("batch_size", 5)
    options.setdefault("time_budget", 0.001)
    job = gae_deferred.iterate(Item.query(), jobs_support.bump, **options)
    queue.run(queue.tasks[0])
    for task in list(queue.tasks):
        queue.run(task)
    return job, keys


def test_the_jobs_page_lists_state_shards_counts_rate_and_actions(app, queue):
    job, _ = _started(queue, name="backfill <b>", finalize=jobs_support.record_totals)
    page = app.get(f"{P}/jobs")
    assert page.status_int == 200
    row = page.html.find("tr", attrs={"data-job": job.id})
    cells = [cell.get_text(" ", strip=True) for cell in row.find_all("td")]
    assert cells[0].startswith("backfill <b>")
    assert cells[1] == "running"
    assert cells[2] == "0/3"
    job_record = iteration.get_job(job.id)
    # A count only when the planner read every key: Google's legacy emulator keeps
    # __scatter__, so there the job is split by a sample and its total is not known.
    assert cells[3] == ("15 of 60" if job_record.sharding == "keys" else "15")
    assert cells[4] == "0"
    assert cells[5].endswith("/s")
    assert cells[9] == "pending"
    assert [b.get_text(strip=True) for b in row.find_all("button")] == ["Pause", "Cancel…"]
    for path in ("/jobs", f"/jobs/{job.id}"):
        seen = app.get(P + path, headers={"X-Deferred-Role": "viewer"})
        assert seen.html.find_all("button", string=["Pause", "Cancel…"]) == [], path
    refused = app.post(
        f"{P}/jobs/{job.id}/pause",
        {"csrf_token": csrf_token(app)},
        headers={"X-Deferred-Role": "viewer"},
        status=403,
    )
    assert refused.status_int == 403
    assert iteration.get_job(job.id).state == "running"
    assert "<b>" not in page.text.split("backfill", 1)[1].split("</a>", 1)[0]
    assert page.headers["X-Content-Type-Options"] == "nosniff"

    listed = app.get(f"{P}/api/jobs").json["items"]
    [data] = [item for item in listed if item["id"] == job.id]
    assert (data["state"], data["shards"], data["processed"], data["failed"]) == (
        "running",
        3,
        15,
        0,
    )
    if job_record.sharding == "keys":
        assert data["estimated_total"] == 60
        assert data["rate"] > 0 and data["eta_seconds"] is not None
    else:
        assert (data["sharding"], data["estimated_total"], data["eta_seconds"]) == (
            "scatter",
            None,
            None,
        )
    assert data["actions"] == ["pause", "cancel"]


@pytest.mark.parametrize("shards", [1, 3])
def test_a_job_whose_planner_did_not_read_every_key_counts_its_query_for_the_eta(
    app, queue, monkeypatch, shards
):
    """One shard reads no key, and past PLAN_SCAN_LIMIT keys (or with a __scatter__ sample)
    the planner's keys are not a count: the job's query is counted instead, filter and all.
    Google's legacy emulator cannot count (UNIMPLEMENTED): there, no total and no ETA."""
    monkeypatch.setattr(iteration, "PLAN_SCAN_LIMIT", 10)
    make_items(7, group="other")
    keys = make_items(40)
    job = gae_deferred.iterate(
        Item.query(Item.group == "a"),
        jobs_support.bump,
        shards=shards,
        batch_size=5,
        time_budget=0.001,
    )
    queue.run(queue.tasks[0])
    for task in list(queue.tasks):
        queue.run(task)
    record = iteration.get_job(job.id)
    assert record.sharding in ({"single"} if shards == 1 else {"keys", "scatter"})
    if record.sharding == "keys":
        assert record.sample_size == iteration.PLAN_SCAN_LIMIT  # it stopped there
    data = app.get(f"{P}/api/jobs/{job.id}").json
    assert data["state"] == "running" and 0 < data["processed"] < len(keys)
    page = app.get(f"{P}/jobs/{job.id}").html.find(id="job-processed").get_text(" ", strip=True)
    if stack_support.DATASTORE == "datastore":
        assert (record.counted, data["estimated_total"], data["eta_seconds"]) == (None,) * 3
        assert page == str(data["processed"])
    else:
        assert record.counted == data["estimated_total"] == len(keys)
        assert data["rate"] > 0 and data["eta_seconds"] is not None
        assert page == f"{data['processed']} of {len(keys)}"


def test_the_job_page_shows_shards_and_failed_entities(app, queue):
    keys = make_items(12, poison=frozenset({4}))
    job = gae_deferred.iterate(Item.query(), jobs_support.bump, shards=1, batch_size=5)
    while queue.tasks:
        with contextlib.suppress(ValueError):
            queue.run_all()
    data = app.get(f"{P}/api/jobs/{job.id}").json
    assert (data["state"], data["processed"], data["failed"]) == ("done", 11, 1)
    assert data["actions"] == []
    [failed] = data["failed_entities"]
    assert failed["entity"] == f"Item {keys[4].id()!r}"
    assert failed["exception_type"] == "ValueError"
    assert failed["attempts"] == 6
    [shard] = data["shard_list"]
    assert (shard["processed"], shard["failed"], shard["done"]) == (11, 1, True)
    page = app.get(f"{P}/jobs/{job.id}")
    table = page.html.find("table", class_="failed-entities")
    assert f"Item {keys[4].id()!r}" in table.get_text()
    assert "poisoned item" in table.get_text()
    assert page.html.find(id="job-state").get_text() == "done"
    listing = app.get(f"{P}/jobs")
    link = listing.html.find("tr", attrs={"data-job": job.id}).find("td", class_="failed").a
    assert link["href"] == f"{P}/jobs/{job.id}#failed"


def test_pause_resume_and_cancel_from_the_pages_need_csrf_and_are_audited(app, queue):
    job, _ = _started(queue)
    refused = app.post(f"{P}/jobs/{job.id}/pause", {"csrf_token": "0" * 64}, expect_errors=True)
    assert refused.status_int == 403
    assert iteration.get_job(job.id).state == "running"

    page = app.get(f"{P}/jobs/{job.id}")
    token = form_token(page)
    done = app.post(f"{P}/jobs/{job.id}/pause", {"csrf_token": token, "back": f"{P}/jobs"})
    assert (done.status_int, done.headers["Location"].endswith(f"{P}/jobs")) == (303, True)
    assert iteration.get_job(job.id).state == "paused"
    queue.run_all()  # the shards stop
    processed = sum(shard.processed for shard in iteration.job_shards(job.id))

    again = app.post(f"{P}/jobs/{job.id}/pause", {"csrf_token": token}, expect_errors=True)
    assert again.status_int == 409

    resumed = app.post(f"{P}/jobs/{job.id}/resume", {"csrf_token": token}).follow()
    assert "resume done" in resumed.text
    assert len(queue.tasks) == 3

    question = app.post(f"{P}/jobs/{job.id}/cancel", {"csrf_token": token})
    assert question.status_int == 200
    assert "Cancel job" in question.text
    assert iteration.get_job(job.id).state == "running"
    app.post(f"{P}/jobs/{job.id}/cancel", {"csrf_token": token, "confirm": "yes"})
    assert iteration.get_job(job.id).state == "cancelled"
    queue.run_all()
    assert sum(shard.processed for shard in iteration.job_shards(job.id)) == processed

    entries, _ = audit.recent()
    assert [(entry.action, entry.target) for entry in entries][:3] == [
        ("cancel job", f"job/{job.id}"),
        ("resume job", f"job/{job.id}"),
        ("pause job", f"job/{job.id}"),
    ]


def test_the_json_actions_take_the_header_token(app, queue):
    job, _ = _started(queue)
    token = csrf_token(app)
    paused = app.post_json(f"{P}/api/jobs/{job.id}/pause", {}, headers={"X-CSRF-Token": token})
    assert paused.json == {"ok": True, "message": f"Job {job.name}: pause done.", "state": "paused"}
    cancelled = app.post_json(f"{P}/api/jobs/{job.id}/cancel", {}, headers={"X-CSRF-Token": token})
    assert cancelled.json["state"] == "cancelled"
    missing = app.post_json(
        f"{P}/api/jobs/no-such-job/pause", {}, headers={"X-CSRF-Token": token}, expect_errors=True
    )
    assert missing.status_int == 404
    assert missing.json["error"] == "no job 'no-such-job'"


def test_a_job_name_is_escaped(app, queue):
    job = gae_deferred.iterate(Item.query(), jobs_support.bump, name=XSS)
    for path in (f"{P}/jobs", f"{P}/jobs/{job.id}"):
        text = app.get(path).text
        assert XSS not in text
        assert "&lt;script&gt;" in text
