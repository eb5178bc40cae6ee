"""defer() through the real CloudTasksClient and gRPC, against the local Cloud Tasks emulator.

Queues are paused so created tasks stay put for inspection; Datastore is the in-memory stub.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading

import pytest
import webapp2
import webtest
from google.cloud import ndb, tasks_v2

import gae_deferred
from gae_deferred import (
    DeferError,
    EnqueueError,
    PayloadState,
    PayloadTooLargeError,
    QueueNotFoundError,
    SerializationError,
    TaskAlreadyExistsError,
    defer,
    envelope,
    spillover,
)
from gae_deferred.cloud_tasks import client as tasks_client
from gae_deferred.webapp2 import deferred_routes
from tests.callables import add
from tests.fixtures import RESULTS, collect


@pytest.fixture(autouse=True)
def _fresh_results():
    RESULTS.clear()


def body_of(task):
    return task.app_engine_http_request.body


def test_defer_creates_a_signed_app_engine_task(paused):
    result = defer(add, 2, b=3)
    (task,) = paused()
    request = task.app_engine_http_request
    assert request.http_method == tasks_v2.HttpMethod.POST
    assert request.relative_uri == "/_ah/queue/deferred/tests.callables.add"
    assert request.headers["Content-Type"] == "application/octet-stream"
    assert gae_deferred.run(request.body) == 5
    assert result.name == task.name.rsplit("/", 1)[-1]
    assert result.queue == "default" and not result.spilled
    assert result.function == "tests.callables.add"
    assert result.task_bytes == len(request.body)


def test_lambda_url_is_made_safe(paused):
    defer(lambda: None)
    (task,) = paused()
    uri = task.app_engine_http_request.relative_uri
    assert uri.endswith("test_defer.test_lambda_url_is_made_safe._locals_._lambda_")
    assert "<" not in uri


def test_countdown_and_eta(paused):
    before = datetime.datetime.now(datetime.UTC)
    defer(add, 1, _countdown=3600, _queue="reports")
    eta = (before + datetime.timedelta(days=10)).replace(microsecond=0, tzinfo=None)
    defer(add, 2, _eta=eta, _queue="reports")
    times = sorted(t.schedule_time.timestamp() for t in paused("reports"))
    assert abs(times[0] - (before.timestamp() + 3600)) < 5
    assert times[1] == eta.replace(tzinfo=datetime.UTC).timestamp()


def test_named_task_dedup(paused):
    defer(add, 1, _name="nightly-2026-11-28")
    with pytest.raises(TaskAlreadyExistsError, match="nightly-2026-11-28"):
        defer(add, 1, _name="nightly-2026-11-28")
    tasks_client().delete_task(name=paused()[0].name)
    with pytest.raises(TaskAlreadyExistsError):
        defer(add, 1, _name="nightly-2026-11-28")


def test_routing_and_headers(paused):
    defer(add, 1, _target="v7.worker", _headers={"X-Trace": "abc"}, _url="/custom/path")
    defer(add, 2, _service="svc", _version="v2", _instance="3")
    first, second = sorted(
        paused(), key=lambda t: t.app_engine_http_request.app_engine_routing.service != "worker"
    )
    routing = first.app_engine_http_request.app_engine_routing
    assert (routing.service, routing.version) == ("worker", "v7")
    assert first.app_engine_http_request.headers["X-Trace"] == "abc"
    assert first.app_engine_http_request.relative_uri == "/custom/path"
    routing = second.app_engine_http_request.app_engine_routing
    assert (routing.service, routing.version, routing.instance) == ("svc", "v2", "3")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"_queue": "no such queue"}, "not a valid queue name"),
        ({"_name": "bad/name"}, "not a valid task name"),
        ({"_countdown": -1}, "_countdown"),
        ({"_countdown": "10"}, "_countdown"),
        ({"_countdown": float("nan")}, "_countdown"),
        ({"_countdown": float("inf")}, "_countdown"),
        ({"_countdown": 10**12}, "_countdown of 1000000000000 seconds is past the last date"),
        ({"_countdown": 1, "_eta": datetime.datetime(2030, 1, 1)}, "not both"),
        ({"_eta": "tomorrow"}, "_eta must be a datetime"),
        ({"_headers": {"X-CloudTasks-QueueName": "x"}}, "Cloud Tasks sets it"),
        ({"_headers": {"X": 1}}, "str to str"),
        ({"_url": "http://evil/"}, "_url must be a path"),
        ({"_target": "a.b.c"}, "_target"),
        ({"_retry_options": {"task_retry_limit": -1}}, "task_retry_limit"),
        ({"_retry_options": {"retries": 1}}, "unknown field"),
    ],
)
def test_bad_options_are_clear_errors_and_enqueue_nothing(paused, options, message):
    with pytest.raises(DeferError, match=message):
        defer(add, 1, **options)
    assert paused() == []


def test_retry_options_travel_in_the_envelope(paused):
    class Options:
        task_retry_limit = 2
        task_age_limit = 60
        min_backoff_seconds = None
        max_backoff_seconds = None
        max_doublings = None

    defer(add, 1, _retry_options=Options())
    (task,) = paused()
    header = envelope.read_header(body_of(task))
    assert header["retry"] == {"task_retry_limit": 2, "task_age_limit": 60}


def test_unknown_queue(paused):
    with pytest.raises(QueueNotFoundError, match="queues sync"):
        defer(add, 1, _queue="missing")


def test_unpicklable_argument_fails_at_defer_time(paused):
    with pytest.raises(SerializationError, match="positional argument 0"):
        defer(add, threading.Lock())
    assert paused() == []


# --- spillover boundaries ---------------------------------------------------------------------


def _payload_for_envelope_size(target):
    """An argument whose envelope (with the default URL and headers) is exactly ``target`` bytes."""
    gae_deferred.configure(compression_level=0)
    call = gae_deferred.enqueue.prepare_call(collect, (b"\0" * target,), {})
    size = call.spec.size(call.data)
    return b"\0" * (target - (size - target))


@pytest.mark.parametrize(("delta", "spilled"), [(-1, False), (0, False), (1, True)])
def test_spill_threshold_boundary(paused, delta, spilled):
    limit = gae_deferred.settings().spill_threshold
    arg = _payload_for_envelope_size(limit + delta)
    result = defer(collect, arg)
    assert result.spilled is spilled
    assert len(spillover.DeferredPayload.query().fetch()) == int(spilled)


def test_spilled_task_keeps_name_schedule_queue_headers_and_routing(paused):
    eta = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=3)
    result = defer(
        collect,
        os.urandom(200_000),
        _name="big-one",
        _eta=eta,
        _queue="reports",
        _headers={"X-Trace": "t1"},
        _target="v3.worker",
        _countdown=None,
    )
    assert result.spilled and result.name == "big-one"
    (task,) = paused("reports")
    request = task.app_engine_http_request
    assert task.name.endswith("/tasks/big-one")
    assert task.schedule_time.timestamp() == eta.timestamp()
    assert request.headers["X-Trace"] == "t1"
    assert (request.app_engine_routing.service, request.app_engine_routing.version) == (
        "worker",
        "v3",
    )
    assert len(request.body) < 2_000
    record = spillover.get(result.payload_id)
    assert (record.queue, record.task_name, record.state) == ("reports", "big-one", "pending")
    assert record.eta == eta
    assert record.function.endswith("fixtures.collect")
    assert record.meta["function"] == record.function
    assert record.task["headers"]["X-Trace"] == "t1"


def test_unnamed_tasks_get_random_names_their_records_follow(paused):
    spilled = defer(collect, os.urandom(300_000))
    inline = defer(collect, 1)
    assert spilled.name.startswith("d-") and inline.name.startswith("d-")
    assert spilled.name != inline.name and len(spilled.name) == 34
    assert spillover.get(spilled.payload_id).task_name == spilled.name


@pytest.mark.parametrize(("size", "chunks"), [(1_000_000 - 600, 1), (1_048_576, 2), (5_000_000, 6)])
def test_chunk_boundaries(paused, size, chunks):
    gae_deferred.configure(compression_level=0)
    result = defer(collect, b"\1" * size)
    assert result.chunks == chunks
    record = spillover.get(result.payload_id)
    assert record.stored_bytes == result.stored_bytes
    assert record.payload_bytes >= size


def test_hard_cap(paused):
    gae_deferred.configure(compression_level=0)
    cap = gae_deferred.settings().max_payload_bytes
    result = defer(collect, os.urandom(cap - 1024))
    assert result.chunks == 34
    with pytest.raises(PayloadTooLargeError, match="over the 33,554,432 byte cap"):
        defer(collect, b"\0" * cap)
    assert len(spillover.DeferredPayload.query().fetch()) == 1


def test_large_spill_is_written_in_commits_under_datastore_limit(paused, datastore_commits):
    gae_deferred.configure(compression_level=0)
    defer(collect, b"\2" * 20_000_000)
    # 21 chunks of 1 MB, three a commit: every request within commit_bytes (3 MiB), well
    # under the 4 MiB Datastore and Google's emulators accept.
    assert datastore_commits.chunk_bytes()[:6] == [3_000_000] * 6
    assert max(datastore_commits.request_bytes()) <= 3 * 1024 * 1024
    kinds = datastore_commits.kinds()
    assert len(kinds) == 7
    # The record last; a write marker with the first chunks, deleted with the record.
    assert [commit.count("_DeferredPayload") for commit in kinds] == [0] * 6 + [1]
    assert "_DeferredPayloadWrite" in kinds[0] and "-_DeferredPayloadWrite" in kinds[-1]
    assert spillover.DeferredPayloadWrite.query().fetch() == []


def test_cloud_tasks_too_large_under_threshold_spills(paused):
    gae_deferred.configure(spill_threshold=500_000, compression_level=0)
    result = defer(collect, b"\0" * 200_000)
    assert result.spilled
    (task,) = paused()
    assert len(body_of(task)) < 2_000


def test_closure_with_600kb_argument_round_trips_through_spill_and_run(paused):
    blob = os.urandom(600_000)

    def closure():
        collect(blob)

    result = defer(closure)
    assert result.spilled
    (task,) = paused()
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    response = app.post(
        task.app_engine_http_request.relative_uri,
        body_of(task),
        headers={"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": result.name},
    )
    assert response.status_int == 200
    assert [(blob,)] == RESULTS
    assert spillover.get(result.payload_id) is None


def test_spill_rpcs_one_commit_and_one_create_task(paused, tasks_emulator, ndb_stub):
    calls = []
    for name in ("lookup", "commit", "run_query"):
        wrapper = getattr(ndb_stub.stub, name)
        original = wrapper.func
        wrapper.func = lambda req, *a, _n=name, _o=original, **k: (
            calls.append(_n),
            _o(req, *a, **k),
        )[1]
    tasks_emulator.reset_counts()
    defer(collect, os.urandom(3_000_000))
    assert calls == ["commit"]
    assert tasks_emulator.rpc_counts["CreateTask"] == 1


# --- transactional ----------------------------------------------------------------------------


class Order(ndb.Model):
    total = ndb.IntegerProperty()


def test_transactional_defer_enqueues_on_commit(paused):
    @ndb.transactional()
    def place():
        Order(id="o1", total=3).put()
        result = defer(add, 1, _transactional=True)
        assert paused() == []
        return result

    result = place()
    (task,) = paused()
    assert task.name.endswith("/tasks/" + result.name)
    assert spillover.get(result.payload_id).transactional


def test_transactional_defer_rolled_back_leaves_nothing(paused):
    @ndb.transactional()
    def place():
        Order(id="o2", total=3).put()
        defer(add, 1, _transactional=True)
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        place()
    assert paused() == []
    assert spillover.DeferredPayload.query().fetch() == []
    assert Order.get_by_id("o2") is None


def test_transactional_outside_a_transaction_is_refused(paused):
    with pytest.raises(DeferError, match="needs an active ndb transaction"):
        defer(add, 1, _transactional=True)


def test_cloud_tasks_unavailable_is_a_clear_error_and_leaves_no_spill(ndb_stub, monkeypatch):
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:9")
    gae_deferred.cloud_tasks.reset_client()
    try:
        with pytest.raises(EnqueueError, match="Cloud Tasks could not create the task"):
            defer(collect, os.urandom(300_000))
        assert spillover.DeferredPayload.query().fetch() == []
    finally:
        gae_deferred.cloud_tasks.reset_client()


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers: CreateTask's fate is unknown."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def test_unanswered_create_task_keeps_the_spill_for_the_sweeper(paused, silent_server, monkeypatch):
    real_host = os.environ["CLOUD_TASKS_EMULATOR_HOST"]
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", silent_server)
    gae_deferred.cloud_tasks.reset_client()
    gae_deferred.configure(cloud_tasks_timeout_seconds=0.5)
    try:
        with pytest.raises(gae_deferred.EnqueueOutcomeUnknown, match="do not defer it again"):
            defer(collect, os.urandom(300_000))
    finally:
        monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", real_host)
        gae_deferred.cloud_tasks.reset_client()
    (record,) = spillover.DeferredPayload.query().fetch()
    assert record.state == PayloadState.PENDING
    later = spillover.now() + datetime.timedelta(days=1)
    assert gae_deferred.sweep(now=later).reenqueued == 1
    (task,) = paused()
    assert task.name.endswith("/tasks/" + record.task_name)


def test_failed_multi_commit_spill_leaves_no_orphaned_chunks(paused, datastore_commits):
    from google.api_core import exceptions as api_exceptions

    gae_deferred.configure(compression_level=0)
    datastore_commits.fail_when = lambda request: (
        api_exceptions.PermissionDenied("datastore went away")
        if len(datastore_commits.requests) == 2
        else None
    )
    # Not retried, and not called "unavailable": Datastore refused it.
    with pytest.raises(gae_deferred.DatastoreRefusedError, match=r"refused.*datastore went away"):
        defer(collect, b"\3" * 12_000_000)
    datastore_commits.fail_when = None
    # The first commit's chunks and write marker were deleted again.
    assert spillover.DeferredPayloadWrite.query().fetch() == []
    assert spillover.DeferredPayloadChunk.query().fetch(keys_only=True) == []
    assert spillover.DeferredPayload.query().fetch() == []
    assert paused() == []


# --- legacy parity: transactions, names, headers -----------------------------------------------


def run_queued(task):
    """Deliver a queued task to the handler as Cloud Tasks would; returns the HTTP status."""
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    request = task.app_engine_http_request
    headers = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": task.name.split("/")[-1]}
    return app.post(request.relative_uri, request.body, headers=headers, expect_errors=True)


@pytest.mark.parametrize("commits", [True, False])
def test_spilled_defer_inside_a_transaction_is_independent_of_it(paused_on_emulator, commits):
    """Legacy semantics: only _transactional=True ties a task to the transaction."""
    big = os.urandom(300_000)

    @ndb.transactional()
    def place():
        Order(id="o3", total=1).put()
        result = defer(collect, big)
        # Committed already, in a commit of its own: visible outside the caller's transaction.
        assert ndb.non_transactional()(spillover.get)(result.payload_id) is not None
        if not commits:
            raise RuntimeError("roll back")
        return result

    if commits:
        place()
    else:
        with pytest.raises(RuntimeError):
            place()
    assert (Order.get_by_id("o3") is not None) is commits
    (task,) = paused_on_emulator()
    assert run_queued(task).status_int == 200
    assert [(big,)] == RESULTS
    # Run once: the payload is gone and a duplicate delivery is recognised, not run again.
    assert run_queued(task).status_int == 200
    assert [(big,)] == RESULTS


def test_transactional_spill_runs_only_on_commit(paused):
    @ndb.transactional()
    def place(fail):
        defer(collect, b"\5" * 300_000, _transactional=True)
        if fail:
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        place(True)
    assert paused() == []
    place(False)
    (task,) = paused()
    assert run_queued(task).status_int == 200
    assert RESULTS == [(b"\5" * 300_000,)]


def test_deferred_task_has_the_legacy_task_attributes(paused):
    inline = defer(add, 1, _headers={"X-Trace": "t"})
    (task,) = paused()
    request = task.app_engine_http_request
    assert inline.queue_name == "default" and inline.was_enqueued
    assert inline.url == request.relative_uri
    assert inline.headers["X-Trace"] == "t"
    assert inline.payload == request.body
    assert inline.eta.timestamp() == pytest.approx(task.schedule_time.timestamp(), abs=1)


@pytest.mark.parametrize(
    "spellings",
    [
        ("X-AppEngine-FailFast", "x-appengine-failfast", "X-APPENGINE-FAIL-FAST"),
        ("X-AppEngine-Fail-Fast", "X-AppEngine-FailFast"),
    ],
)
def test_fail_fast_header_is_dropped_with_one_warning_in_either_spelling(paused, caplog, spellings):
    gae_deferred.enqueue._warn_dropped.cache_clear()
    with caplog.at_level("WARNING", logger="gae_deferred"):
        for number, spelling in enumerate(spellings):
            defer(add, number, _headers={spelling: "true", "X-Kept": "yes"})
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "X-AppEngine-Fail-Fast" in warnings[0].getMessage()
    tasks = paused()
    assert len(tasks) == len(spellings)
    for task in tasks:
        headers = {key.lower() for key in task.app_engine_http_request.headers}
        assert "x-kept" in headers
        assert not any("fail" in key for key in headers)


def test_other_app_engine_headers_are_dropped_with_one_warning_each(paused, caplog):
    gae_deferred.enqueue._warn_dropped.cache_clear()
    with caplog.at_level("WARNING", logger="gae_deferred"):
        defer(add, 1, _headers={"X-AppEngine-QueueName": "other", "X-AppEngine-TaskName": "t"})
        defer(add, 2, _headers={"x-appengine-queuename": "other"})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sorted(warnings) == [
        "_headers: x-appengine-queuename is set by App Engine and Cloud Tasks; dropped",
        "_headers: x-appengine-taskname is set by App Engine and Cloud Tasks; dropped",
    ]
    for task in paused():
        assert task.name.split("/")[-3] == "default"
        assert not any(
            k.lower().startswith("x-appengine-q") for k in task.app_engine_http_request.headers
        )
    with pytest.raises(DeferError, match="may not set X-CloudTasks-TaskName"):
        defer(add, 1, _headers={"X-CloudTasks-TaskName": "other"})


def test_legacy_current_namespace_header_names_the_tasks_namespace(paused):
    task = defer(add, 1, _headers={"X-AppEngine-Current-Namespace": "tenant-h"})
    assert gae_deferred.envelope.read_header(task.payload)["namespace"] == "tenant-h"
    (queued,) = paused()
    assert not any("namespace" in key.lower() for key in queued.app_engine_http_request.headers)


def test_queue_missing_as_failed_precondition_is_queue_not_found(ndb_stub, monkeypatch):
    from google.api_core import exceptions as api_exceptions

    class Refusing:
        def __init__(self, error):
            self.error = error

        def create_task(self, parent, task):
            raise self.error

        def new_task_name(self, prefix):
            return f"{prefix}-refused"

    monkeypatch.setattr(
        gae_deferred.cloud_tasks,
        "_sink",
        Refusing(api_exceptions.FailedPrecondition("Queue does not exist.")),
    )
    with pytest.raises(QueueNotFoundError, match="queues sync"):
        defer(add, 1)
    monkeypatch.setattr(
        gae_deferred.cloud_tasks,
        "_sink",
        Refusing(api_exceptions.FailedPrecondition("Queue is disabled.")),
    )
    with pytest.raises(EnqueueError, match="disabled"):
        defer(add, 1)


def test_spill_that_cannot_be_undone_is_outcome_unknown(paused, datastore_commits, monkeypatch):
    """CreateTask failed and deleting the spill failed too: the sweeper will run it, so the
    caller must not defer again (EnqueueOutcomeUnknown, not a plain EnqueueError)."""
    from google.api_core import exceptions as api_exceptions

    real_host = os.environ["CLOUD_TASKS_EMULATOR_HOST"]
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:9")
    gae_deferred.cloud_tasks.reset_client()
    datastore_commits.fail_when = lambda request: (
        api_exceptions.ServiceUnavailable("datastore went away")
        if datastore_commits.deletes(request)
        else None
    )
    try:
        with pytest.raises(gae_deferred.EnqueueOutcomeUnknown, match="do not defer it again"):
            defer(collect, os.urandom(300_000))
    finally:
        datastore_commits.fail_when = None
        monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", real_host)
        gae_deferred.cloud_tasks.reset_client()
    (record,) = spillover.DeferredPayload.query().fetch()
    later = spillover.now() + datetime.timedelta(days=1)
    assert gae_deferred.sweep(now=later).reenqueued == 1
    (task,) = paused()
    assert task.name.endswith("/tasks/" + record.task_name)


@pytest.mark.parametrize(
    "eta",
    [
        datetime.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.UTC),
        datetime.datetime(2031, 5, 6, 7, 8, 9, 123456),  # naive: UTC, as Timestamp reads it
        datetime.datetime(
            2031, 5, 6, 9, 8, 9, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
        ),
    ],
)
def test_build_task_matches_the_proto_plus_construction(eta):
    from gae_deferred.cloud_tasks import TaskSpec, build_task, task_path

    spec = TaskSpec(
        queue="reports",
        url="/_ah/queue/deferred/x",
        headers={"Content-Type": "application/octet-stream", "X-Trace": "t"},
        eta=eta,
        name="n-1",
        routing={"service": "worker", "version": "v2"},
    )
    expected = tasks_v2.Task(
        name=task_path("reports", "n-1"),
        schedule_time=eta if eta.tzinfo else eta.replace(tzinfo=datetime.UTC),
        app_engine_http_request=tasks_v2.AppEngineHttpRequest(
            http_method=tasks_v2.HttpMethod.POST,
            relative_uri=spec.url,
            headers=spec.headers,
            body=b"body",
            app_engine_routing=tasks_v2.AppEngineRouting(service="worker", version="v2"),
        ),
    )
    assert build_task(spec, b"body") == expected


def test_spill_whose_chunk_only_commit_is_unanswered_is_certainly_not_stored(
    paused, ndb_stub, monkeypatch
):
    """A 12 MB spill's first commit holds only chunks; it lands and its answers are lost.
    Its record's commit was never sent, so nothing can run: DatastoreUnavailableError (not
    EnqueueOutcomeUnknown), and the chunks that landed are deleted."""
    from google.api_core import exceptions as api_exceptions

    gae_deferred.configure(compression_level=0)
    wrapper = ndb_stub.stub.commit
    original = wrapper.func
    record_kind = spillover.DeferredPayload._get_kind()

    def lands_then_loses_the_answer(request, *args, **kwargs):
        response = original(request, *args, **kwargs)
        kinds = {m.upsert.key.path[-1].kind for m in request.mutations if m._pb.HasField("upsert")}
        if kinds and record_kind not in kinds:
            raise api_exceptions.ServiceUnavailable("connection reset after the commit")
        return response

    monkeypatch.setattr(wrapper, "func", lands_then_loses_the_answer)
    with pytest.raises(gae_deferred.DatastoreUnavailableError, match="connection reset"):
        defer(collect, b"\4" * 12_000_000)
    monkeypatch.setattr(wrapper, "func", original)
    assert spillover.DeferredPayloadChunk.query().fetch(keys_only=True) == []
    assert spillover.DeferredPayload.query().fetch() == []
    assert paused() == []
