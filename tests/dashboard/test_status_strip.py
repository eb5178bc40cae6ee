"""The status strip on every page: waiting, in flight, retrying, dead, processed, linked to
their lists; cached a few seconds, refreshed after an action."""

from __future__ import annotations

import re

import gae_deferred
from gae_deferred import FailureState, iteration, metrics
from tests.dashboard.support import P, csrf_token, make_failure, pause, sample


def strip(page_text: str) -> dict[str, tuple[str, str]]:
    found = re.search(r'<nav class="status" id="status-strip"[^>]*>(.*?)</nav>', page_text, re.S)
    assert found, "no status strip"
    return {
        label: (href, number)
        for href, number, label in re.findall(
            r'<a href="([^"]+)"[^>]*><strong>([^<]+)</strong> ([a-z ()]+)</a>', found.group(1)
        )
    }


def test_every_page_shows_the_status_strip_with_links(app):
    pause("default")
    for number in range(2):
        gae_deferred.defer(sample, number, _countdown=600)
    make_failure("t-r", state=FailureState.RETRYING)
    for name in ("t-d1", "t-d2"):
        make_failure(name, state=FailureState.DEAD)
    for _ in range(3):
        metrics.observe("test_admin.sample", "default", 0.01, ok=True, retried=False)
    metrics.flush()
    failure_id = make_failure("t-d3", state=FailureState.DISMISSED).id
    for job_id, state in (("j1", "running"), ("j2", "planning"), ("j3", "paused"), ("j4", "done")):
        iteration.DeferredJob(id=job_id, name=job_id, state=state).put()
    expected = {
        "waiting": (f"{P}/queues", "2"),
        "in flight": (f"{P}/queues", "0"),
        "retrying": (f"{P}/failures/list?state=retrying", "1"),
        "dead": (f"{P}/failures/list?state=dead", "2"),
        "processed (last hour)": (f"{P}/metrics?window=1h", "3"),
        "jobs running": (f"{P}/jobs", "2"),
    }
    for path in (
        "",
        "/metrics",
        "/spillover",
        "/failures",
        "/failures/list",
        "/queues",
        "/queues/default",
        "/audit",
        f"/failures/{failure_id}",
    ):
        assert strip(app.get(P + path).text) == expected, path
    assert app.get(f"{P}/api/status").json["dead"] == 2
    # Failure counts are read per page (they agree with the page); the Cloud Tasks numbers are
    # cached a few seconds, and dropped after an action.
    make_failure("t-d4", state=FailureState.DEAD)
    gae_deferred.defer(sample, 3, _countdown=600)
    numbers = strip(app.get(f"{P}/audit").text)
    assert numbers["dead"][1] == "3" and numbers["waiting"][1] == "2"
    token = csrf_token(app)
    app.post(f"{P}/api/failures/{failure_id}/delete", {"csrf_token": token})
    assert strip(app.get(f"{P}/audit").text)["waiting"][1] == "3"


def test_a_403_page_has_no_strip(app):
    gae_deferred.configure(local_mode=False)
    denied = app.get(P, extra_environ={"REMOTE_ADDR": "203.0.113.5"}, expect_errors=True)
    assert denied.status_int == 403 and 'id="status-strip"' not in denied.text
