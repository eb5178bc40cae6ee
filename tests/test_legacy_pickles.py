"""Cut-over from python27: task bodies the legacy library made, delivered to our handler.

The bodies in tests/legacy_py2/bodies.json were made by Python 2.7 pickling the legacy way
(tests/legacy_py2/make_bodies.py). In drain mode (legacy_pickles_until, on App Engine, App
Engine's task headers) they run and their failures are recorded; otherwise every one is a 403,
counted per reason and shown on the dashboard.
"""

from __future__ import annotations

import datetime
import json

import pytest
import webapp2
import webtest
from google.cloud import ndb

import gae_deferred
from gae_deferred import ConfigurationError, FailureState, failures, legacy_pickles, refusals
from gae_deferred.webapp2 import deferred_routes
from tests import legacy_targets
from tests.fixtures import BODIES, TASK

KEY = "ag5zfnRlc3QtcHJvamVjdHIaCxITX0RlZmVycmVkVGFza0VudGl0eRiSIQw"
APP_ENGINE = {"X-AppEngine-QueueName": "default"}


def headers(name: str, **more: str) -> dict[str, str]:
    return {**APP_ENGINE, "X-AppEngine-TaskName": name, **more}


@pytest.fixture
def app(ndb_stub):
    legacy_targets.RUNS.clear()
    refusals.discard_pending()
    return webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))


@pytest.fixture
def draining(app, monkeypatch):
    """On App Engine, draining legacy pickles until tomorrow."""
    monkeypatch.setenv("GAE_ENV", "standard")
    tomorrow = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)
    gae_deferred.configure(legacy_pickles_until=tomorrow.isoformat())
    return app


def test_the_bodies_were_made_by_python_2_7_with_protocol_2():
    assert BODIES["python"] == "2.7.18"
    for name in ("inline", "method", "failing", "spilled", "spilled_entity"):
        assert BODIES[name][:2] == b"\x80\x02", name
        assert legacy_pickles.is_legacy_pickle(BODIES[name])


def test_an_inline_legacy_body_runs_with_python_2_text_bytes_and_datetimes(draining):
    answer = draining.post("/_ah/queue/deferred", BODIES["inline"], headers=headers("legacy-1"))
    assert answer.status_int == 200, answer.text
    [(args, kwargs)] = legacy_targets.RUNS
    # UTF-8 str -> str, unicode -> str, binary str -> bytes; keyword names stay str.
    assert args == ("café", "naïve", b"\xff\x00\x89PNG")
    assert kwargs == {"when": datetime.datetime(2026, 12, 7, 1, 2, 3, 456789), "count": 7}
    assert refusals.summary()["legacy_runs"] == 1


def test_a_bound_method_through_invoke_member_runs(draining):
    answer = draining.post("/_ah/queue/deferred", BODIES["method"], headers=headers("legacy-2"))
    assert answer.status_int == 200, answer.text
    assert legacy_targets.RUNS == [("Counter.add", 42)]


def test_a_spilled_legacy_body_runs_from_its_entity_and_deletes_it(draining):
    entity = legacy_pickles._DeferredTaskEntity(
        key=ndb.Key(urlsafe=KEY.encode()), data=BODIES["spilled_entity"]
    )
    entity.put()
    answer = draining.post("/_ah/queue/deferred", BODIES["spilled"], headers=headers("legacy-3"))
    assert answer.status_int == 200, answer.text
    assert legacy_targets.RUNS == [(("x" * 5000,), {"size": "big"})]
    assert entity.key.get() is None
    assert entity.key.kind() == "_DeferredTaskEntity"


def test_a_spilled_legacy_body_whose_entity_is_gone_fails_permanently(draining):
    answer = draining.post("/_ah/queue/deferred", BODIES["spilled"], headers=headers("legacy-4"))
    assert answer.status_int == 200
    record = failures.get(failures.failure_id("default", "legacy-4"))
    assert record.state == FailureState.PERMANENT and "is gone" in record.message


def test_a_failing_legacy_body_is_recorded_and_retriggerable(draining):
    answer = draining.post(
        "/_ah/queue/deferred", BODIES["failing"], headers=headers("legacy-5"), status=500
    )
    assert answer.text == "retrying\n"
    record = failures.get(failures.failure_id("default", "legacy-5"))
    assert record.state == FailureState.RETRYING
    assert record.function == "tests.legacy_targets.boom"
    assert record.exception_type == "RuntimeError" and record.message == "it broke"
    assert record.meta["python"] == "2.7" and record.meta["serializer"] == "legacy-pickle"
    # Kept as a signed envelope of the same call: a retrigger runs it on this runtime.
    kept = failures.get_payload(record.key.id())
    with pytest.raises(RuntimeError, match="it broke"):
        gae_deferred.run(kept)
    # A later attempt that succeeds resolves it.
    legacy_targets.RUNS.clear()
    again = draining.post(
        "/_ah/queue/deferred",
        BODIES["inline"],
        headers=headers("legacy-5", **{"X-AppEngine-TaskRetryCount": "1"}),
    )
    assert again.status_int == 200
    assert failures.get(record.key.id()).state == FailureState.RESOLVED


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("off", "configure legacy_pickles_until"),
        ("expired", "refused since"),
        ("not-app-engine", "only on App Engine"),
    ],
)
def test_outside_the_drain_a_legacy_body_is_refused_counted_and_runs_nothing(
    app, monkeypatch, setup, reason
):
    if setup != "not-app-engine":
        monkeypatch.setenv("GAE_ENV", "standard")
    today = datetime.datetime.now(datetime.UTC).date()
    if setup == "expired":
        gae_deferred.configure(legacy_pickles_until=today - datetime.timedelta(days=1))
    elif setup != "off":
        gae_deferred.configure(legacy_pickles_until=today)
    answer = app.post(
        "/_ah/queue/deferred", BODIES["inline"], headers=headers("legacy-6"), status=403
    )
    assert answer.text == "forbidden\n"
    assert legacy_targets.RUNS == []
    summary = refusals.summary()
    assert summary["counts"]["legacy-pickle"] == 1 and summary["legacy_runs"] == 0
    [example] = summary["examples"]
    assert (example["queue"], example["task_name"], example["reason"]) == (
        "default",
        "legacy-6",
        "legacy-pickle",
    )
    assert reason in example["message"]
    assert "body" not in example and "caf" not in json.dumps(example)


def test_cloud_tasks_headers_alone_refuse_a_legacy_body_before_it_is_read(app, monkeypatch):
    """On App Engine only App Engine's own task headers prove the queue sent a request (the
    trust model): X-CloudTasks-* alone is refused as not from the queue, during the drain too,
    before the body is read, so it is never counted as a legacy pickle."""
    monkeypatch.setenv("GAE_ENV", "standard")
    gae_deferred.configure(legacy_pickles_until=datetime.datetime.now(datetime.UTC).date())
    sent = {"X-CloudTasks-QueueName": "default", "X-CloudTasks-TaskName": "legacy-6"}
    answer = app.post("/_ah/queue/deferred", BODIES["inline"], headers=sent, status=403)
    assert answer.text == "forbidden\n"
    assert legacy_targets.RUNS == []
    summary = refusals.summary()
    assert summary["counts"]["not-from-queue"] == 1
    assert summary["counts"].get("legacy-pickle", 0) == 0 and summary["legacy_runs"] == 0


def test_the_drain_date_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GAE_DEFERRED_LEGACY_PICKLES_UNTIL", "2027-01-31")
    gae_deferred.reset_clients()
    assert gae_deferred.settings().legacy_pickles_until == datetime.date(2027, 1, 31)
    monkeypatch.setenv("GAE_DEFERRED_LEGACY_PICKLES_UNTIL", "next month")
    gae_deferred.reset_clients()
    with pytest.raises(ConfigurationError, match="YYYY-MM-DD"):
        gae_deferred.settings()


def test_every_refused_delivery_is_counted_per_reason_and_written(app):
    good = gae_deferred.serialize(legacy_targets.record, 1)
    app.post("/_ah/queue/deferred", good, status=403)  # no task headers
    app.post("/_ah/queue/deferred", b"plain bytes", headers=TASK, status=403)
    forged = good[:-1] + bytes([good[-1] ^ 1])
    app.post("/_ah/queue/deferred", forged, headers=TASK, status=403)
    from gae_deferred.enqueue import prepare_call

    call = prepare_call(legacy_targets.record, (1,), {}, name="other-task")
    app.post("/_ah/queue/deferred", call.data, headers=TASK, status=403)
    app.post("/_ah/queue/deferred", BODIES["inline"], headers=TASK, status=403)
    assert legacy_targets.RUNS == []
    expected = {
        "not-from-queue": 1,
        "unsigned": 1,
        "bad-signature": 1,
        "wrong-task": 1,
        "legacy-pickle": 1,
    }
    # Every reason is in the summary, zero or not (HTTP targets' bad-token here).
    assert refusals.summary()["counts"] == {**expected, "bad-token": 0}
    refusals.flush()
    stored = refusals.DeferredRefusals.get_by_id("totals")
    assert stored.counts == expected
    assert [example["reason"] for example in stored.examples] == [
        "legacy-pickle",
        "wrong-task",
        "bad-signature",
        "unsigned",
        "not-from-queue",
    ]
    # What is written is not counted twice.
    assert refusals.summary()["total"] == 5


def test_a_legacy_body_that_cannot_load_is_dead_and_refused_for_retrigger(draining):
    from gae_deferred import admin
    from gae_deferred.errors import Conflict

    # Protocol 2, as python27 wrote it, naming a module this app no longer has.
    body = b"\x80\x02cno_such_module\nwork\nq\x00)}q\x01\x87q\x02."
    assert legacy_pickles.is_legacy_pickle(body)
    answer = draining.post("/_ah/queue/deferred", body, headers=headers("legacy-7"))
    assert answer.status_int == 200
    record = failures.get(failures.failure_id("default", "legacy-7"))
    assert record.state == FailureState.DEAD
    assert record.exception_type == "gae_deferred.errors.PayloadLoadError"
    assert "python27 deferred library" in record.message
    with pytest.raises(Conflict, match="python27 pickle that does not load here"):
        admin.retrigger_failure(record.key.id(), "admin@example.com")


def test_configure_takes_a_day_as_text_or_a_date_and_refuses_anything_else():
    assert gae_deferred.configure(legacy_pickles_until="2027-01-31").legacy_pickles_until == (
        datetime.date(2027, 1, 31)
    )
    day = datetime.date(2027, 2, 1)
    assert gae_deferred.configure(legacy_pickles_until=day).legacy_pickles_until == day
    assert gae_deferred.configure(legacy_pickles_until=None).legacy_pickles_until is None
    for wrong in ("31/01/2027", datetime.datetime(2027, 1, 31, 12)):
        with pytest.raises(ConfigurationError, match="must be a day"):
            gae_deferred.configure(legacy_pickles_until=wrong)


def test_a_forked_worker_counts_and_writes_on_its_own(app):
    import os

    refusals.record("unsigned", None, "before the fork")
    assert refusals._pending.timer is not None  # armed in the parent
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the worker: no parent's counts, and its own timer when it counts
        fresh = refusals._pending.counts == {} and refusals._pending.timer is None
        refusals.record("unsigned", None, "in the worker")
        armed = refusals._pending.timer is not None
        refusals.discard_pending()
        os.write(write, b"ok" if fresh and armed else b"no")
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 2) == b"ok"
    assert refusals.summary()["counts"]["unsigned"] == 1
