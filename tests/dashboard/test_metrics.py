"""Execution metrics: counted in memory on the task path, flushed in one transaction per
interval, shown by the Metrics page and the JSON API within one histogram bucket."""

from __future__ import annotations

import bisect
import datetime
import threading
import time

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import PermanentTaskFailure, TaskInfo, envelope, execute_task, metrics
from gae_deferred.webapp2 import deferred_routes
from tests.dashboard.support import LOOPBACK, P


def bucket_of(ms: float) -> int:
    return bisect.bisect_left(metrics.BUCKETS_MS, ms)


def within_one_bucket(shown_ms: float, true_ms: float) -> bool:
    return abs(bucket_of(shown_ms) - bucket_of(true_ms)) <= 1


def commits(stub_client) -> list:
    """Record every Commit the stub receives."""
    from inmemory_datastore_stub._request_wrapper import _RequestWrapper

    seen: list = []
    stub = stub_client.stub
    original = stub.commit

    def recording(request, *args, **kwargs):
        seen.append(request)
        return original(request, *args, **kwargs)

    wrapper = _RequestWrapper(recording)
    stub.commit = stub.Commit = wrapper
    return seen


@pytest.fixture(autouse=True)
def _clean_recorder():
    metrics.discard_pending()
    yield
    metrics.discard_pending()


def test_known_runs_show_their_count_and_percentiles_within_one_bucket(app, ndb_stub):
    durations = [0.004] * 50 + [0.040] * 40 + [0.900] * 9 + [2.5]
    for index, seconds in enumerate(durations):
        metrics.observe(
            "reports.build", "reports", seconds, ok=index % 10 != 0, retried=index % 25 == 0
        )
    metrics.observe("mail.send", "default", 0.010, ok=True, retried=False)
    assert metrics.flush() == 5  # 2 functions, 2 queues, all
    data = app.get(f"{P}/api/metrics?window=1h&function=reports.build").json
    hour = data["windows"]["1h"]
    assert (hour["runs"], hour["successes"], hour["failures"], hour["retries"]) == (100, 90, 10, 4)
    assert within_one_bucket(hour["p50_ms"], 4) and within_one_bucket(hour["p95_ms"], 900)
    assert hour["max_ms"] == pytest.approx(2500)
    assert data["windows"]["24h"]["runs"] == 100 and data["windows"]["7d"]["runs"] == 100
    assert sum(point["runs"] for point in data["by_minute"]) == 100
    assert len(data["by_minute"]) == 60 and len(data["by_hour"]) == 7 * 24
    listing = app.get(f"{P}/api/metrics?window=24h").json
    assert [item["name"] for item in listing["items"]] == ["reports.build", "mail.send"]
    assert listing["all"]["windows"]["24h"]["runs"] == 101
    assert {q["name"]: q["windows"]["24h"]["runs"] for q in listing["queues"]} == {
        "default": 1,
        "reports": 100,
    }
    page = app.get(f"{P}/metrics?window=1h")
    assert "reports.build" in page.text and ">100<" in page.text
    function_page = page.click("reports.build")
    assert function_page.text.count("<svg") == 2
    assert f'href="{P}/failures/list?function=reports.build"' in function_page.text


def test_sorting_by_failures_and_p95(app, ndb_stub):
    for _ in range(5):
        metrics.observe("many.runs", "default", 0.002, ok=True, retried=False)
    for _ in range(2):
        metrics.observe("often.fails", "default", 0.002, ok=False, retried=False)
    metrics.observe("slow.one", "default", 12.0, ok=True, retried=False)
    metrics.flush()

    def names(sort: str) -> list[str]:
        items = app.get(f"{P}/api/metrics?window=7d&sort={sort}").json["items"]
        return [item["name"] for item in items]

    assert names("runs")[0] == "many.runs"
    assert names("failures")[0] == "often.fails"
    assert names("p95")[0] == "slow.one"
    assert app.get(f"{P}/api/metrics?window=2h", expect_errors=True).status_int == 400
    assert app.get(f"{P}/api/metrics?sort=fun", expect_errors=True).status_int == 400
    assert app.get(f"{P}/api/metrics?function=never.ran", expect_errors=True).status_int == 404


def test_observe_does_no_io_and_a_flush_is_one_commit(ndb_stub):
    seen = commits(ndb_stub)
    for number in range(1000):
        metrics.observe(f"fn.{number % 20}", "default", 0.001, ok=True, retried=False)
    assert seen == []
    metrics.flush()
    assert len(seen) == 1
    assert metrics.flush() == 0 and len(seen) == 1  # nothing new: no write at all


def test_observers_on_many_threads_lose_no_run_and_the_queue_stays_bounded(ndb_stub, monkeypatch):
    """observe() appends without a lock; whoever finds _DRAIN_AT runs waiting adds them up, so
    8 threads of 2,500 runs each, with a flush in the middle, count 20,000 runs exactly."""
    monkeypatch.setattr(metrics, "_DRAIN_AT", 500)
    longest: list[int] = []

    def observe_many(thread: int) -> None:
        for number in range(2500):
            ok = number % 10 != 0
            metrics.observe(f"many.{thread % 2}", "default", 0.004, ok=ok, retried=False)
            longest.append(len(metrics._recorder.runs))

    threads = [threading.Thread(target=observe_many, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    metrics.flush()
    for thread in threads:
        thread.join()
    metrics.flush()
    totals = [metrics.get_series("function", f"many.{n}").window("1h") for n in (0, 1)]
    assert [window.runs for window in totals] == [10_000, 10_000]
    assert [window.failures for window in totals] == [1_000, 1_000]
    assert max(longest) < 500 + 8  # each thread drains once it finds 500 waiting
    assert not metrics._recorder.runs and not metrics._recorder.pending


def test_totals_of_several_flushes_and_processes_add_up(ndb_stub):
    for _ in range(3):
        metrics.observe("add.up", "default", 0.05, ok=True, retried=False)
        metrics.flush()
    series = metrics.get_series("function", "add.up")
    assert series.window("1h").runs == 3 and series.window("7d").runs == 3


def test_a_failed_flush_keeps_the_totals_for_the_next_one(ndb_stub, monkeypatch):
    metrics.observe("kept.back", "default", 0.01, ok=True, retried=False)

    def broken(*args, **kwargs):
        raise RuntimeError("Datastore is down")

    monkeypatch.setattr(metrics.ndb, "transaction", broken)
    assert metrics.flush() == 0
    monkeypatch.undo()
    gae_deferred.configure(ndb_client=ndb_stub)
    assert metrics.flush() == 3
    assert metrics.get_series("function", "kept.back").window("1h").runs == 1


def test_sweeper_refreshes_aged_windows_and_purges_quiet_series(ndb_stub):
    metrics.observe("goes.quiet", "default", 0.01, ok=True, retried=False)
    metrics.flush()
    record = metrics.series_key("function", "goes.quiet").get()
    assert record.runs_1h == 1 and record.next_change is not None
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=2)
    refreshed, purged = metrics.maintain(later)
    assert refreshed >= 1 and purged == 0
    record = metrics.series_key("function", "goes.quiet").get()
    assert (record.runs_1h, record.runs_24h) == (0, 1)
    report = gae_deferred.sweep(now=later + datetime.timedelta(days=9))
    assert report.purged_metrics == 3
    assert metrics.get_series("function", "goes.quiet") is None


def raises_for_good() -> None:
    raise PermanentTaskFailure("no")


def test_the_task_path_counts_each_run_once(ndb_stub, tasks_emulator):
    client = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()), extra_environ=LOOPBACK)
    good = envelope.serialize(time.sleep, 0.03)
    bad = envelope.serialize(raises_for_good)
    for name, body, retry in (("a", good, "0"), ("b", good, "2"), ("c", bad, "0")):
        headers = {
            "X-AppEngine-QueueName": "default",
            "X-AppEngine-TaskName": name,
            "X-AppEngine-TaskRetryCount": retry,
        }
        client.post("/_ah/queue/deferred", body, headers=headers)
    assert execute_task(good, TaskInfo(name="d", queue="reports")).status == 200
    metrics.flush()
    sleep = metrics.get_series("function", "time.sleep").window("1h")
    assert (sleep.runs, sleep.successes, sleep.retries) == (3, 3, 1)
    assert within_one_bucket(sleep.p50_ms, 30)
    failed = metrics.get_series("function", envelope.function_name(raises_for_good)).window("1h")
    assert (failed.runs, failed.failures) == (1, 1)
    assert metrics.get_series("queue", "reports").window("1h").runs == 1


def test_metrics_can_be_turned_off(ndb_stub):
    gae_deferred.configure(metrics_enabled=False, ndb_client=ndb_stub)
    metrics.observe("off.switch", "default", 0.01, ok=True, retried=False)
    assert metrics.flush() == 0
