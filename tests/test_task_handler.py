"""The task handler, through WebTest: every row of docs/design.md's status table and its records."""

from __future__ import annotations

import concurrent.futures
import logging
import os

import pytest
import webapp2
import webtest
from google.cloud import ndb

import gae_deferred
from gae_deferred import (
    FailureState,
    PayloadState,
    PermanentTaskFailure,
    SingularTaskFailure,
    failures,
    serialize,
    spillover,
)
from gae_deferred.cloud_tasks import TaskSpec
from gae_deferred.enqueue import reference
from gae_deferred.webapp2 import deferred_routes
from tests.fixtures import ROOT, TASK, zlib_bomb

RUNS: list = []


def record_run(*args, **kwargs):
    RUNS.append((args, kwargs, gae_deferred.current_task()))


def fail_with(exc):
    RUNS.append(exc)
    raise exc


def fail_until(attempts_needed):
    RUNS.append(gae_deferred.task_retry_count())
    if gae_deferred.task_retry_count() < attempts_needed:
        raise RuntimeError(f"not yet ({gae_deferred.task_retry_count()})")


@pytest.fixture
def app(ndb_stub):
    RUNS.clear()
    return webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))


@pytest.fixture
def rpc_counter(ndb_stub):
    """Counts Datastore RPCs the stub serves (each name ndb calls)."""
    counts: dict[str, int] = {}
    stub = ndb_stub.stub
    for name in ("lookup", "commit", "run_query", "begin_transaction", "rollback", "allocate_ids"):
        wrapper = getattr(stub, name)
        original = wrapper.func

        def counted(request, *args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(request, *args, **kwargs)

        wrapper.func = counted
    return counts


def task_body(obj, *args, headers=TASK, **kwargs):
    """An envelope made for the task ``headers`` name, as defer() makes it."""
    return gae_deferred.envelope.build(
        obj,
        args,
        kwargs,
        task=headers.get("X-AppEngine-TaskName") or headers.get("X-CloudTasks-TaskName"),
        queue=headers.get("X-AppEngine-QueueName") or headers.get("X-CloudTasks-QueueName"),
    )


def post(app, body, headers=TASK, status="*"):
    return app.post("/_ah/queue/deferred", body, headers=headers, status=status)


def all_failures():
    return failures.DeferredFailure.query().fetch()


def test_no_task_headers_is_403_and_nothing_runs(app):
    response = post(app, task_body(record_run, 1, headers={}), headers={})
    assert response.status_int == 403
    assert RUNS == []


def test_bad_signature_is_403_logged_and_nothing_runs(app, caplog):
    data = bytearray(task_body(record_run, 1))
    data[-1] ^= 0xFF
    with caplog.at_level(logging.ERROR, logger="gae_deferred"):
        response = post(app, bytes(data))
    assert response.status_int == 403
    assert RUNS == []
    assert "signature does not match" in caplog.text
    assert all_failures() == []


def test_missing_signature_is_403(app):
    assert post(app, task_body(record_run, 1)[:-32]).status_int == 403
    assert post(app, b"").status_int == 403
    assert RUNS == []


def test_success_is_200_with_zero_datastore_rpcs(app, rpc_counter):
    response = post(app, task_body(record_run, 1, key="v"))
    assert response.status_int == 200
    assert RUNS[0][:2] == ((1,), {"key": "v"})
    assert rpc_counter == {}


def test_task_context_is_visible_to_the_function(app):
    headers = {
        **TASK,
        "X-AppEngine-TaskRetryCount": "2",
        "X-AppEngine-TaskExecutionCount": "1",
        "X-AppEngine-TaskETA": "1700000000.5",
    }
    post(app, task_body(record_run, headers=headers), headers=headers)
    task = RUNS[0][2]
    assert (task.name, task.queue, task.retry_count, task.execution_count, task.eta) == (
        "task-1",
        "default",
        2,
        1,
        1700000000.5,
    )
    assert gae_deferred.current_task() is None


def test_cloud_tasks_http_target_headers_are_accepted(app):
    headers = {"X-CloudTasks-QueueName": "default", "X-CloudTasks-TaskName": "t9"}
    assert post(app, task_body(record_run, headers=headers), headers=headers).status_int == 200
    assert RUNS[0][2].name == "t9"


def test_on_app_engine_cloud_tasks_headers_alone_never_prove_a_task(app, monkeypatch):
    """App Engine strips only X-AppEngine-* from outside requests: X-CloudTasks-* can be forged,
    so a captured body replayed with them from the internet must not run."""
    monkeypatch.setenv("GAE_ENV", "standard")
    forged = {"X-CloudTasks-QueueName": "default", "X-CloudTasks-TaskName": "t9"}
    response = post(app, task_body(record_run, headers=forged), headers=forged)
    assert (response.status_int, response.text) == (403, "forbidden\n")
    mixed = {"X-AppEngine-QueueName": "default", "X-CloudTasks-TaskName": "t9"}
    assert post(app, task_body(record_run, headers=mixed), headers=mixed).status_int == 403
    assert RUNS == []
    assert post(app, task_body(record_run, 7)).status_int == 200
    assert RUNS[0][0] == (7,)


def test_on_app_engine_task_details_come_from_app_engine_headers_only(monkeypatch):
    monkeypatch.setenv("GAE_ENV", "standard")
    headers = {
        **TASK,
        "X-CloudTasks-TaskName": "other",
        "X-CloudTasks-TaskRetryCount": "9",
        "X-AppEngine-TaskRetryCount": "2",
    }
    info = gae_deferred.TaskInfo.from_headers(headers)
    assert (info.name, info.queue, info.retry_count) == ("task-1", "default", 2)
    assert gae_deferred.TaskInfo.from_headers({"X-CloudTasks-QueueName": "q"}) is None
    monkeypatch.setenv("GAE_ENV", "")
    info = gae_deferred.TaskInfo.from_headers(
        {"X-CloudTasks-QueueName": "q", "X-CloudTasks-TaskName": "t"}
    )
    assert (info.name, info.queue) == ("t", "q")


def test_function_name_in_the_url_is_only_for_logs(app):
    response = app.post(
        "/_ah/queue/deferred/tests.test_task_handler.record_run",
        task_body(record_run, 5),
        headers=TASK,
    )
    assert response.status_int == 200
    assert RUNS[0][0] == (5,)


def test_get_is_not_allowed(app):
    assert app.get("/_ah/queue/deferred", headers=TASK, status="*").status_int == 405


def test_oversized_body_is_refused_before_reading(app):
    response = app.post("/_ah/queue/deferred", b"x" * (1024 * 1024 + 1), headers=TASK, status="*")
    assert response.status_int == 413


def test_singular_failure_retries_without_error_log(app, caplog):
    with caplog.at_level(logging.DEBUG, logger="gae_deferred"):
        response = post(app, task_body(fail_with, SingularTaskFailure()))
    assert response.status_int == 408
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all_failures() == []


def test_permanent_failure_is_200_and_recorded(app):
    response = post(app, task_body(fail_with, PermanentTaskFailure("order <b>gone</b>")))
    assert response.status_int == 200
    (record,) = all_failures()
    assert record.state == FailureState.PERMANENT
    assert record.exception_type == "gae_deferred.errors.PermanentTaskFailure"
    assert record.message == "order <b>gone</b>"
    assert record.function.endswith("test_task_handler.fail_with")
    assert record.queue == "default" and record.task_name == "task-1"
    assert failures.get_payload(record.id) is not None


def test_payload_that_cannot_be_unpickled_is_200_and_recorded(app):
    from gae_deferred import envelope

    header = {"function": "gone.module.fn", "python": "3.11", "task": "task-1", "queue": "default"}
    data = envelope._seal(header, b"\x80\x05bogus", 0)
    response = post(app, data)
    assert response.status_int == 200
    (record,) = all_failures()
    assert record.state == FailureState.DEAD
    assert "cannot load payload of gone.module.fn" in record.message
    assert "written by Python 3.11" in record.message
    assert failures.get_payload(record.id) == data


def test_other_exception_is_500_with_traceback_then_resolved(app):
    data = task_body(fail_until, 2)
    assert post(app, data).status_int == 500
    (record,) = all_failures()
    assert record.state == FailureState.RETRYING and record.attempts == 1
    assert "RuntimeError: not yet (0)" in record.traceback
    assert "in fail_until" in record.traceback

    assert post(app, data, headers={**TASK, "X-AppEngine-TaskRetryCount": "1"}).status_int == 500
    assert post(app, data, headers={**TASK, "X-AppEngine-TaskRetryCount": "2"}).status_int == 200
    (record,) = all_failures()
    assert record.state == FailureState.RESOLVED
    assert record.attempts == 2
    assert record.first_seen <= record.last_seen


def test_last_allowed_attempt_becomes_a_dead_letter(app):
    # queue.yaml gives the default queue task_retry_limit 5.
    headers = {**TASK, "X-AppEngine-TaskRetryCount": "5"}
    assert (
        post(
            app, task_body(fail_with, ValueError("x"), headers=headers), headers=headers
        ).status_int
        == 500
    )
    (record,) = all_failures()
    assert record.state == FailureState.DEAD
    assert failures.get_payload(record.id)


def test_per_task_retry_limit_is_enforced_before_running(app):
    data = gae_deferred.envelope.build(
        record_run, (), {}, retry={"task_retry_limit": 1}, task="task-1", queue="default"
    )
    assert post(app, data, headers={**TASK, "X-AppEngine-TaskRetryCount": "1"}).status_int == 200
    assert len(RUNS) == 1
    response = post(app, data, headers={**TASK, "X-AppEngine-TaskRetryCount": "2"})
    assert response.status_int == 200
    assert len(RUNS) == 1
    (record,) = all_failures()
    assert record.state == FailureState.DEAD and "retry limit 1" in record.message


@pytest.mark.parametrize("limit", [0, 2])
def test_task_retry_limit_gives_legacys_deliveries_and_keeps_the_real_exception(app, limit):
    # Legacy (taskqueue_stub Retry.CanRetry): retry n is allowed while limit >= n: limit + 1 runs.
    data = gae_deferred.envelope.build(
        fail_with,
        (ValueError("the real one"),),
        {},
        retry=gae_deferred.TaskRetryOptions(task_retry_limit=limit).as_dict(),
        task="task-1",
        queue="default",
    )
    statuses = []
    for retries in range(limit + 1):
        headers = {**TASK, "X-AppEngine-TaskRetryCount": str(retries)}
        statuses.append(post(app, data, headers=headers).status_int)
    # The queue (queue.yaml: 5 retries) would go on: the last one answers 200 to end it.
    assert statuses == [500] * limit + [200]
    assert len(RUNS) == limit + 1
    (record,) = all_failures()
    assert record.state == FailureState.DEAD and record.attempts == limit + 1
    assert record.exception_type == "ValueError" and record.message == "the real one"
    assert "in fail_with" in record.traceback and "ValueError: the real one" in record.traceback
    # A duplicate delivery past the limit runs nothing and leaves the record as it was.
    headers = {**TASK, "X-AppEngine-TaskRetryCount": str(limit + 1)}
    assert post(app, data, headers=headers).status_int == 200
    assert len(RUNS) == limit + 1
    (again,) = all_failures()
    assert (again.exception_type, again.attempts, again.traceback) == (
        "ValueError",
        limit + 1,
        record.traceback,
    )


def test_singular_failure_on_the_tasks_own_last_attempt_ends_it_as_a_dead_letter(app):
    data = gae_deferred.envelope.build(
        fail_with,
        (SingularTaskFailure("later"),),
        {},
        retry={"task_retry_limit": 1},
        task="task-1",
        queue="default",
    )
    assert post(app, data).status_int == 408
    last = post(app, data, headers={**TASK, "X-AppEngine-TaskRetryCount": "1"})
    assert last.status_int == 200
    (record,) = all_failures()
    assert record.state == FailureState.DEAD
    assert record.exception_type == "gae_deferred.errors.SingularTaskFailure"


def test_failure_record_text_is_bounded(app):
    post(app, task_body(fail_with, ValueError("m" * 100_000)))
    (record,) = all_failures()
    assert len(record.message) <= 4000


# --- spilled payloads -------------------------------------------------------------------------


def spill(obj, *args):
    """Store a payload the way defer() does, returning the reference envelope."""
    data = task_body(obj, *args)
    header = gae_deferred.envelope.read_header(data)
    payload_id = spillover.new_payload_id()
    spec = TaskSpec(
        queue="default",
        url="/_ah/queue/deferred",
        headers={},
        eta=spillover.now(),
        name="task-1",
    )
    record, chunks = spillover.build_record(
        payload_id,
        data,
        header,
        queue="default",
        task_name=spec.name,
        eta=spec.eta,
        task=spec.to_json(),
    )
    spillover.write_many([(record, chunks)])
    return record, reference(record)


def test_spilled_success_deletes_record_and_chunks(app, rpc_counter):
    big = "x" * 3_000_000
    record, reference = spill(record_run, big)
    assert record.chunks >= 1
    rpc_counter.clear()
    assert post(app, reference).status_int == 200
    assert RUNS[0][0] == (big,)
    # The claim's transaction (begin, read, write), one Lookup of the payload, one Commit.
    assert rpc_counter == {"begin_transaction": 1, "lookup": 2, "commit": 2}
    assert spillover.DeferredPayload.query().fetch() == []
    assert spillover.DeferredPayloadChunk.query().fetch(keys_only=True) == []


def test_spilled_chunked_payload_round_trips(app, rpc_counter):
    gae_deferred.configure(compression_level=0)
    blob = bytes(range(256)) * 12_000  # 3 MB: 4 chunks
    record, reference = spill(record_run, blob)
    assert record.chunks == 4
    rpc_counter.clear()
    assert post(app, reference).status_int == 200
    assert RUNS[0][0] == (blob,)
    # The claim's transaction (begin, read, write), one Lookup of the payload, one Commit.
    assert rpc_counter == {"begin_transaction": 1, "lookup": 2, "commit": 2}


def test_spilled_payload_over_lookup_bytes_is_read_in_lookups_of_at_most_that(
    app, rpc_counter, monkeypatch
):
    gae_deferred.configure(compression_level=0)
    monkeypatch.setattr(spillover, "LOOKUP_BYTES", 2_500_000)
    blob = bytes(range(256)) * 24_000  # 6.1 MB: 7 chunks, read 2 at a time
    record, reference = spill(record_run, blob)
    assert record.chunks == 7
    rpc_counter.clear()
    assert post(app, reference).status_int == 200
    assert RUNS[0][0] == (blob,)
    assert rpc_counter == {"begin_transaction": 1, "lookup": 5, "commit": 2}
    assert spillover.DeferredPayloadChunk.query().fetch(keys_only=True) == []


def test_lookup_groups_keep_every_response_under_grpcs_default_receive_limit():
    # Default chunks of 1,000,000 bytes: 3 per Lookup, beside a record of up to 1 MiB.
    assert spillover.LOOKUP_BYTES // 1_000_000 == 3
    assert spillover.lookup_groups(3, 2_900_000) == [range(1, 4)]
    assert spillover.lookup_groups(9, 8 * 1024 * 1024) == [range(1, 4), range(4, 7), range(7, 10)]
    groups = spillover.lookup_groups(34, 32 * 1024 * 1024)
    assert len(groups) == 12 and [n for group in groups for n in group] == list(range(1, 35))
    # Without the stored size, every chunk counts as full.
    assert spillover.lookup_groups(3) == [range(1, 4)]
    assert spillover.lookup_groups(4) == [range(1, 4), range(4, 5)]
    largest = 3 * 1_000_000 + 1024 * 1024  # three full chunks and the biggest possible record
    assert largest < spillover.GRPC_RECEIVE_LIMIT - 60 * 1024


def test_spilled_chunk_missing_from_a_later_lookup_is_200_and_permanent(app, monkeypatch):
    gae_deferred.configure(compression_level=0)
    monkeypatch.setattr(spillover, "LOOKUP_BYTES", 2_500_000)
    record, reference = spill(record_run, b"\x01" * 4_500_000)
    spillover.chunk_keys(record.id, record.chunks)[3].delete()
    assert post(app, reference).status_int == 200
    assert RUNS == []
    assert "lacks chunk(s) [4]" in all_failures()[0].message


def test_spilled_chunks_that_do_not_match_the_record_are_200_and_permanent(app, monkeypatch):
    gae_deferred.configure(compression_level=0)
    monkeypatch.setattr(spillover, "LOOKUP_BYTES", 2_500_000)
    record, reference = spill(record_run, b"\x01" * 4_500_000)
    last = spillover.chunk_keys(record.id, record.chunks)[-1].get()
    last.data += b"more"
    last.put()
    assert post(app, reference).status_int == 200
    assert RUNS == []
    assert "does not add up" in all_failures()[0].message


def test_spilled_permanent_failure_keeps_the_record(app):
    record, reference = spill(fail_with, PermanentTaskFailure("no"))
    assert post(app, reference).status_int == 200
    kept = spillover.get(record.id)
    assert kept.state == PayloadState.PERMANENT and kept.attempts == 1
    (failure,) = all_failures()
    assert failure.payload_id == record.id
    assert failures.get_payload(failure.id) is None


def test_spilled_retryable_failure_keeps_the_record_retrying(app):
    record, reference = spill(fail_with, ValueError("later"))
    assert post(app, reference).status_int == 500
    assert spillover.get(record.id).state == PayloadState.RETRYING


def test_spilled_payload_missing_is_retried_within_the_grace_period_then_permanent(
    app, monkeypatch
):
    import time

    from gae_deferred import execution

    record, reference = spill(record_run, "x")
    spillover.delete(record.id, record.chunks)
    # Not there yet, for a reference this young: its commit may still be in flight.
    assert post(app, reference).status_int == 503
    assert all_failures() == []
    later = time.time() + execution.SPILL_VISIBILITY_GRACE_SECONDS + 1
    monkeypatch.setattr(execution.time, "time", lambda: later)
    assert post(app, reference).status_int == 200
    assert RUNS == []
    (failure,) = all_failures()
    assert failure.state == FailureState.PERMANENT
    assert "gone from Datastore" in failure.message


def test_spilled_chunk_missing_is_200_and_permanent(app):
    gae_deferred.configure(compression_level=0)
    record, reference = spill(record_run, b"\x01" * 2_500_000)
    spillover.chunk_keys(record.id, record.chunks)[1].delete()
    assert post(app, reference).status_int == 200
    assert "lacks chunk(s) [2]" in all_failures()[0].message


def test_retriggered_failure_updates_the_same_record(app):
    assert post(app, task_body(fail_with, ValueError("a"))).status_int == 500
    (record,) = all_failures()
    headers = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "other"}
    body = gae_deferred.envelope.rebind(task_body(record_run), task="other", failure_id=record.id)
    assert post(app, body, headers=headers).status_int == 200
    (record,) = all_failures()
    assert record.state == FailureState.RESOLVED


def test_failure_records_are_per_task(app):
    post(app, task_body(fail_with, ValueError("a")))
    post(
        app,
        task_body(fail_with, ValueError("b"), headers={**TASK, "X-AppEngine-TaskName": "task-2"}),
        headers={**TASK, "X-AppEngine-TaskName": "task-2"},
    )
    assert sorted(r.task_name for r in all_failures()) == ["task-1", "task-2"]


def test_run_legacy_reads_spilled_payloads(ndb_stub):
    _, reference = spill(sum, [1, 2, 3])
    assert gae_deferred.run(reference) == 6


class Counter(ndb.Model):
    value = ndb.IntegerProperty()


def bump_counter():
    counter = Counter.get_by_id("c") or Counter(id="c", value=0)
    counter.value += 1
    counter.put()
    RUNS.append(counter.value)


def bump_then_fail():
    bump_counter()
    raise ValueError("after the write")


def test_handler_threads_reuse_a_clean_ndb_context(app, ndb_stub):
    """Without an outer context each worker thread keeps one ndb context, cache cleared per task."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as worker:

        def run_task(obj, expected_status):
            return worker.submit(lambda: post(app, task_body(obj)).status_int).result()

        assert run_task(bump_counter, 200) == 200
        Counter(id="c", value=10).put()  # changed behind the worker's context cache
        assert run_task(bump_counter, 200) == 200
        assert run_task(bump_then_fail, 500) == 500
        assert run_task(bump_counter, 200) == 200
    assert RUNS == [1, 11, 12, 13]


def test_unreadable_queue_yaml_costs_only_dead_letter_detection(app, tmp_path, caplog):
    broken = tmp_path / "queue.yaml"
    broken.write_text("queue:\n- name: default\n  rate: 5/x\n")
    gae_deferred.configure(queue_yaml=str(broken))
    headers = {**TASK, "X-AppEngine-TaskRetryCount": "50"}
    body = task_body(fail_with, ValueError("x"), headers=headers)
    with caplog.at_level(logging.ERROR, logger="gae_deferred"):
        assert post(app, body, headers=headers).status_int == 500
    assert "queue.yaml:3" in caplog.text
    assert all_failures()[0].state == FailureState.RETRYING


def test_app_refuses_to_start_with_a_broken_queue_yaml(tmp_path):
    import subprocess
    import sys

    broken = tmp_path / "queue.yaml"
    broken.write_text("queue:\n- name: default\n  rate: 5/x\n")
    env = {**os.environ, "GAE_DEFERRED_QUEUE_YAML": str(broken)}
    result = subprocess.run(
        [sys.executable, "-c", "import main"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"{broken}:3" in result.stderr


def test_per_task_age_limit_is_enforced_before_running(app, monkeypatch):
    import time

    from gae_deferred import execution

    data = gae_deferred.envelope.build(
        record_run, (), {}, retry={"task_age_limit": 60}, task="task-1", queue="default"
    )
    assert post(app, data).status_int == 200
    later = time.time() + 61
    monkeypatch.setattr(execution.time, "time", lambda: later)
    assert post(app, data, headers={**TASK, "X-AppEngine-TaskRetryCount": "3"}).status_int == 200
    assert len(RUNS) == 1
    (record,) = all_failures()
    assert record.state == FailureState.DEAD and "age limit 60" in record.message


def test_mixed_task_header_prefixes_still_name_the_task():
    info = gae_deferred.TaskInfo.from_headers(
        {
            "X-AppEngine-QueueName": "q",
            "X-CloudTasks-TaskName": "t",
            "X-AppEngine-TaskRetryCount": "2",
        }
    )
    assert (info.queue, info.name, info.retry_count) == ("q", "t", 2)


# --- security: binding, bodies, references, methods ------------------------------------------


def test_envelope_replayed_as_another_task_or_queue_is_403(app):
    body = task_body(record_run, 1)
    other_task = {**TASK, "X-AppEngine-TaskName": "task-2"}
    other_queue = {**TASK, "X-AppEngine-QueueName": "reports"}
    assert post(app, body, headers=other_task).status_int == 403
    assert post(app, body, headers=other_queue).status_int == 403
    assert RUNS == []
    assert post(app, body).status_int == 200


def test_unbound_envelopes_run_but_unbound_references_never_do(app):
    """serialize() binds to no task (legacy apps post its output themselves); a reference to a
    spilled payload is only ever made by defer(), bound, so an unbound one is refused."""
    assert post(app, serialize(record_run, 1)).status_int == 200
    assert (
        post(
            app, serialize(record_run, 2), headers={**TASK, "X-AppEngine-TaskName": "x"}
        ).status_int
        == 200
    )
    assert [args for args, _, _ in RUNS] == [(1,), (2,)]
    _, bound = spill(record_run, "spilled")
    header = gae_deferred.envelope.read_header(bound)
    for field in ("task", "queue", "kid"):
        del header[field]
    unbound = gae_deferred.envelope._seal(header, b"", gae_deferred.envelope.FLAG_REFERENCE)
    assert post(app, unbound).status_int == 403
    assert len(RUNS) == 2


def test_failure_id_header_is_ignored(app):
    """Only the signed envelope may name another failure record (a dashboard retrigger)."""
    assert post(app, task_body(fail_with, ValueError("victim"))).status_int == 500
    (victim,) = all_failures()
    headers = {**TASK, "X-AppEngine-TaskName": "task-2", "X-Deferred-Failure-Id": victim.id}
    body = task_body(fail_with, ValueError("attacker"), headers=headers)
    assert post(app, body, headers=headers).status_int == 500
    again = failures.get(victim.id)
    assert again.message == "victim" and again.attempts == 1
    assert len(all_failures()) == 2


class _Input:
    """A wsgi.input that counts what the handler reads from it."""

    def __init__(self, data: bytes, *, stall_after: int | None = None):
        self.data, self.position, self.read_calls = data, 0, 0
        self.stall_after = stall_after

    def read(self, size: int = -1) -> bytes:
        self.read_calls += 1
        end = len(self.data) if size < 0 else min(len(self.data), self.position + size)
        chunk = self.data[self.position : end]
        self.position = end
        return chunk


def call_raw(environ_overrides: dict, stream: _Input) -> tuple[str, dict]:
    import webob

    environ = webob.Request.blank("/_ah/queue/deferred", method="POST").environ
    environ.update(environ_overrides)
    environ["wsgi.input"] = stream
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured.update(status=status, headers=dict(headers))

    b"".join(webapp2.WSGIApplication(deferred_routes())(environ, start_response))
    return captured["status"], captured["headers"]


def test_headers_are_checked_before_any_of_the_body_is_read(ndb_stub):
    stream = _Input(b"x" * 5_000_000)
    status, _ = call_raw({"CONTENT_LENGTH": "5000000"}, stream)
    assert status.startswith("403") and stream.read_calls == 0


def test_oversized_bodies_are_413_and_read_at_most_the_cap(ndb_stub):
    from gae_deferred.webapp2.deferred_task import MAX_BODY_BYTES

    task = {"HTTP_X_APPENGINE_QUEUENAME": "default", "HTTP_X_APPENGINE_TASKNAME": "task-1"}
    declared = _Input(b"x" * (MAX_BODY_BYTES + 10))
    status, _ = call_raw({**task, "CONTENT_LENGTH": str(MAX_BODY_BYTES + 10)}, declared)
    assert status.startswith("413") and declared.read_calls == 0
    chunked = _Input(b"x" * 50_000_000)
    environ = {**task, "HTTP_TRANSFER_ENCODING": "chunked"}
    environ.pop("CONTENT_LENGTH", None)
    status, _ = call_raw({**environ, "CONTENT_LENGTH": ""}, chunked)
    assert status.startswith("413") and chunked.position == MAX_BODY_BYTES + 1


def test_short_body_is_400(ndb_stub):
    task = {"HTTP_X_APPENGINE_QUEUENAME": "default", "HTTP_X_APPENGINE_TASKNAME": "task-1"}
    status, _ = call_raw({**task, "CONTENT_LENGTH": "1000"}, _Input(b"x" * 10))
    assert status.startswith("400")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405_with_security_headers(app, method):
    response = app.request("/_ah/queue/deferred/x.y", method=method, expect_errors=True)
    assert response.status_int == 405
    assert response.headers["Allow"] == "POST"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_every_answer_carries_the_security_headers(app):
    for response in (
        post(app, b"junk", headers={}),
        post(app, b"junk"),
        post(app, task_body(record_run)),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "ref",
    [
        ["x", 1],
        {"id": "x", "chunks": "1"},
        {"id": "x"},
        {"chunks": 1},
        {"id": 5, "chunks": 1},
        {"id": "x", "chunks": 10**9},
        {"id": "x", "chunks": True},
        "x",
        None,
    ],
)
def test_malformed_signed_references_are_permanent_not_5xx(app, ref):
    header = {"function": "f", "task": "task-1", "queue": "default", "ref": ref}
    data = gae_deferred.envelope._seal(header, b"", gae_deferred.envelope.FLAG_REFERENCE)
    response = post(app, data)
    assert response.status_int == 200
    (failure,) = all_failures()
    assert failure.state == FailureState.PERMANENT
    assert "malformed spilled-payload reference" in failure.message


def test_decompression_is_capped_at_the_declared_size(app):
    bomb = zlib_bomb(64 << 20)
    header = {"function": "f", "task": "task-1", "queue": "default", "raw_bytes": 1000}
    data = gae_deferred.envelope._seal(header, bomb, gae_deferred.envelope.FLAG_ZLIB)
    assert post(app, data).status_int == 200
    (failure,) = all_failures()
    assert (
        failure.state == FailureState.PERMANENT and "inflates past 1,000 bytes" in failure.message
    )


BOMB_SCRIPT = """
import json, sys, zlib
import webapp2, webtest
from inmemory_datastore_stub import Client
import gae_deferred
from gae_deferred.webapp2 import deferred_routes
from tests.fixtures import zlib_bomb

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

client = Client(project="test-project", index_yaml={index!r})
gae_deferred.configure(ndb_client=client, signing_key="5e" * 32, project="test-project")
app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
bomb = zlib_bomb(1 << 30)
header = {{"function": "f", "task": "t", "queue": "default", "raw_bytes": {declared}}}
data = gae_deferred.envelope._seal(header, bomb, gae_deferred.envelope.FLAG_ZLIB)
before = peak_kib()
task = {{"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "t"}}
with client.context():
    status = app.post("/_ah/queue/deferred", data, headers=task, expect_errors=True).status_int
print(json.dumps({{"status": status, "before": before, "after": peak_kib(), "bomb": len(bomb)}}))
"""


@pytest.mark.parametrize("declared", [2_000, 2 << 30])
def test_a_signed_gigabyte_bomb_keeps_peak_memory_bounded(declared):
    """1 GiB of zeros in about 1 MB of zlib: peak RSS grows by less than 100 MiB, whether the
    header declares a small size or a huge one (then max_payload_bytes, 32 MiB, caps it)."""
    import json
    import subprocess
    import sys

    script = BOMB_SCRIPT.format(index=str(ROOT / "index.yaml"), declared=declared)
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["status"] == 200
    assert result["bomb"] < 2 << 20
    assert (result["after"] - result["before"]) * 1024 < 100 << 20, result


def test_duplicate_delivery_of_a_spilled_task_runs_it_once(app):
    _, reference = spill(record_run, "once")
    assert post(app, reference).status_int == 200
    assert post(app, reference).status_int == 200
    assert [args for args, _, _ in RUNS] == [("once",)]
    assert all_failures() == []


def test_payload_moved_to_another_task_is_not_run_by_the_old_one(app):
    record, reference = spill(record_run, "moved")
    record.task_name = "r-new"
    record.put()
    assert post(app, reference).status_int == 200
    assert RUNS == []
    assert spillover.get(record.id) is not None
    moved = gae_deferred.enqueue.reference(record)
    headers = {**TASK, "X-AppEngine-TaskName": "r-new"}
    assert post(app, moved, headers=headers).status_int == 200
    assert [args for args, _, _ in RUNS] == [("moved",)]


# --- retry limits: Cloud Tasks stops only when every limit that is set is reached -------------

LIMITS_YAML = """queue:
- name: count-only
  rate: 1/s
  retry_parameters: {task_retry_limit: 3}
- name: age-only
  rate: 1/s
  retry_parameters: {task_age_limit: 1h}
- name: both
  rate: 1/s
  retry_parameters: {task_retry_limit: 3, task_age_limit: 1d}
"""


@pytest.fixture
def limit_queues(tmp_path):
    from gae_deferred import execution

    path = tmp_path / "queue.yaml"
    path.write_text(LIMITS_YAML)
    # A fresh path per test: the limits cached for another file never apply.
    gae_deferred.configure(queue_yaml=str(path))
    return execution


def _due(seconds_ago):
    import time

    return {"eta_ms": int((time.time() - seconds_ago) * 1000)}


@pytest.mark.parametrize(
    ("queue", "retries", "age", "last"),
    [
        ("count-only", 2, 10**6, False),
        ("count-only", 3, 0, True),
        ("age-only", 50, 3590, False),
        ("age-only", 0, 3610, True),
        ("both", 3, 0, False),  # the count is reached, the age is not: Cloud Tasks retries
        ("both", 2, 90_000, False),  # the age is reached, the count is not
        ("both", 3, 86_410, True),
        ("both", 7, 90_000, True),
    ],
)
def test_last_attempt_needs_every_limit_that_is_set(limit_queues, queue, retries, age, last):
    task = gae_deferred.TaskInfo(name="t", queue=queue, retry_count=retries)
    assert limit_queues.is_last_attempt(task, _due(age)) is last


@pytest.mark.parametrize(
    ("retry", "retries", "age", "over"),
    [
        ({"task_retry_limit": 1}, 2, 0, True),
        ({"task_retry_limit": 1}, 1, 10**6, False),
        ({"task_age_limit": 60}, 1, 61, True),
        ({"task_age_limit": 60}, 0, 61, False),  # a first attempt always runs, as in legacy
        ({"task_retry_limit": 1, "task_age_limit": 60}, 2, 0, False),
        ({"task_retry_limit": 1, "task_age_limit": 60}, 0, 61, False),
        ({"task_retry_limit": 1, "task_age_limit": 60}, 2, 61, True),
    ],
)
def test_per_task_limits_need_every_limit_that_is_set(limit_queues, retry, retries, age, over):
    task = gae_deferred.TaskInfo(name="t", queue="default", retry_count=retries)
    header = {**_due(age), "retry": retry}
    assert bool(limit_queues._over_task_limits(task, header)) is over


def test_dead_letter_on_a_queue_with_both_limits_waits_for_both(app, limit_queues):
    headers = {"X-AppEngine-QueueName": "both", "X-AppEngine-TaskName": "t-both"}
    body = task_body(fail_with, ValueError("x"), headers=headers)
    for retries in (0, 3, 5):
        retry_headers = {**headers, "X-AppEngine-TaskRetryCount": str(retries)}
        assert post(app, body, headers=retry_headers).status_int == 500
    (record,) = all_failures()
    assert record.state == FailureState.RETRYING and record.attempts == 3
