"""Numbers a user can trust: list order under every filter combination, percentiles, labels.

The sort tests run on the project's Datastore emulator (real index rules and merge joins): the
in-memory stub returned the same records in a different order than the emulator did.
"""

from __future__ import annotations

import datetime
import itertools

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import FailureState, PayloadState, metrics, spillover
from gae_deferred.webapp2 import deferred_middleware, deferred_routes
from tests.dashboard.support import LOOPBACK, P, make_failure, make_spilled


@pytest.fixture
def emulator_app(ndb_emulator, fresh_tasks_emulator):
    """The dashboard (local mode, loopback: admin) on the Datastore emulator."""
    gae_deferred.configure(local_mode=True)
    metrics.discard_pending()
    wsgi = deferred_middleware(webapp2.WSGIApplication(deferred_routes()))
    return webtest.TestApp(wsgi, extra_environ=LOOPBACK)


FAILURE_FILTERS = {
    "function": "reports.build",
    "exception": "Timeout",
    "queue": "reports",
    "q": "ledger",
    "state": "dead",
}
TIME_RANGES = {
    "since": {"since": "3h"},
    "until": {"until": "2099-01-01T00:00"},
    "both": {"since": "3h", "until": "2099-01-01T00:00"},
}


def _combinations(names):
    return [
        combo for size in range(len(names) + 1) for combo in itertools.combinations(names, size)
    ]


def test_failure_lists_keep_their_sort_under_every_filter_combination(emulator_app):
    start = spillover.now() - datetime.timedelta(hours=2)
    # Ids in the opposite order of time: a merge join in key order would show oldest first.
    for number in range(5):
        record = make_failure(
            f"t-{number}",
            record_id=f"f-{(9 - number):032x}",
            function="reports.build.run",
            exception_type="requests.exceptions.Timeout",
            message="Deadline exceeded while fetching the ledger",
            queue="reports",
        )
        record.last_seen = start + datetime.timedelta(minutes=10 * number)
        record.put()
    make_failure(
        "t-other", function="mail.send", message="bad address", state=FailureState.RETRYING
    )
    newest_first = [f"f-{(9 - number):032x}" for number in reversed(range(5))]
    checked = 0
    for combo in _combinations(list(FAILURE_FILTERS)):
        for time_range in TIME_RANGES.values():
            for sort, expected in (("newest", newest_first), ("oldest", newest_first[::-1])):
                params = {**{name: FAILURE_FILTERS[name] for name in combo}, **time_range}
                params["sort"] = sort
                for path in ("/api/failures", "/api/failures/list"):
                    items = emulator_app.get(P + path, params).json["items"]
                    got = [item["id"] for item in items if item["function"] != "mail.send"]
                    assert got == expected, (path, params)
                    checked += 1
    assert checked == 32 * 3 * 2 * 2


def test_spillover_list_keeps_its_sort_under_every_filter_combination(emulator_app):
    start = spillover.now() - datetime.timedelta(hours=2)
    for number in range(4):
        make_spilled(
            f"p{9 - number}",
            function="reports.build.run",
            queue="reports",
            state=PayloadState.DEAD,
            created=start + datetime.timedelta(minutes=10 * number),
        )
    newest_first = [f"p{9 - number}" for number in reversed(range(4))]
    for combo in _combinations(["function", "queue"]):
        for time_range in TIME_RANGES.values():
            for sort, expected in (("newest", newest_first), ("oldest", newest_first[::-1])):
                params = {"state": "dead", "sort": sort, **time_range}
                params.update(
                    {name: {"function": "reports", "queue": "reports"}[name] for name in combo}
                )
                items = emulator_app.get(f"{P}/api/spillover", params).json["items"]
                assert [item["id"] for item in items] == expected, params


def test_percentiles_are_never_above_the_exact_maximum(app):
    # Every run 27.8 ms: its bucket's upper bound is 30 ms, the maximum is 27.8 ms.
    for _ in range(20):
        metrics.observe("reports.build", "reports", 0.0278, ok=True, retried=False)
    metrics.observe("reports.build", "reports", 0.0012, ok=True, retried=False)
    metrics.flush()
    data = app.get(f"{P}/api/metrics", {"window": "1h", "function": "reports.build"}).json
    for window in data["windows"].values():
        assert window["p95_ms"] <= window["max_ms"] == 27.8
        assert window["p50_ms"] <= window["max_ms"]
    assert data["windows"]["1h"]["p95_ms"] == 27.8
    for point in data["by_minute"]:
        assert point["p95_ms"] <= point["max_ms"]
    page = app.get(f"{P}/metrics", {"window": "1h"})
    assert "p95 ≤" in page.text and "never above the exact maximum" in page.text
    assert "30 ms" not in page.text


def test_the_first_run_after_a_quiet_interval_is_written_within_seconds(app):
    """Before: the overview said "0 processed" for up to a minute while the failure the run
    recorded already showed. Every instance writes its first run promptly, so this holds
    whichever instance ran the task and whichever serves the dashboard."""
    import threading
    import time

    stop = threading.Event()
    flusher = threading.Thread(
        target=metrics._flush_every, args=(60.0, 0.2, stop, metrics._recorder.wake), daemon=True
    )
    metrics._recorder.wake.clear()
    flusher.start()
    try:
        metrics.observe("reports.build", "reports", 0.01, ok=False, retried=False)
        deadline = time.monotonic() + 5
        while metrics.get_series("all", "") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        numbers = app.get(f"{P}/api/overview").json
        assert sum(point[1] for point in numbers["runs_by_minute"]) == 1
        assert sum(point[2] for point in numbers["runs_by_minute"]) == 1
        # The next runs wait for the interval: still one write per interval at most.
        metrics.observe("reports.build", "reports", 0.01, ok=True, retried=False)
        time.sleep(0.6)
        assert metrics.get_series("all", "").window("1h").runs == 1
    finally:
        stop.set()
        flusher.join(5)
