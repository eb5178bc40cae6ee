"""The task handler, through WebTest: every row of DESIGN.md's status table, and what it records."""

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
from gae_deferred.enqueue import TaskSpec, _reference
from gae_deferred.webapp2 import deferred_routes
from tests.conftest import ROOT

RUNS: list = []
TASK = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "task-1"}


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


def post(app, body, headers=TASK, status="*"):
    return app.post("/_ah/queue/deferred", body, headers=headers, status=status)


def all_failures():
    return failures.DeferredFailure.query().fetch()


def test_no_task_headers_is_403_and_nothing_runs(app):
    response = post(app, serialize(record_run, 1), headers={})
    assert response.status_int == 403
    assert RUNS == []


def test_bad_signature_is_403_logged_and_nothing_runs(app, caplog):
    data = bytearray(serialize(record_run, 1))
    data[-1] ^= 0xFF
    with caplog.at_level(logging.ERROR, logger="gae_deferred"):
        response = post(app, bytes(data))
    assert response.status_int == 403
    assert RUNS == []
    assert "signature does not match" in caplog.text
    assert all_failures() == []


def test_missing_signature_is_403(app):
    assert post(app, serialize(record_run, 1)[:-32]).status_int == 403
    assert post(app, b"").status_int == 403
    assert RUNS == []


def test_success_is_200_with_zero_datastore_rpcs(app, rpc_counter):
    response = post(app, serialize(record_run, 1, key="v"))
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
    post(app, serialize(record_run), headers=headers)
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
    assert post(app, serialize(record_run), headers=headers).status_int == 200
    assert RUNS[0][2].name == "t9"


def test_function_name_in_the_url_is_only_for_logs(app):
    response = app.post(
        "/_ah/queue/deferred/tests.test_task_handler.record_run",
        serialize(record_run, 5),
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
        response = post(app, serialize(fail_with, SingularTaskFailure()))
    assert response.status_int == 408
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all_failures() == []


def test_permanent_failure_is_200_and_recorded(app):
    response = post(app, serialize(fail_with, PermanentTaskFailure("order <b>gone</b>")))
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

    data = envelope._seal({"function": "gone.module.fn", "python": "3.11"}, b"\x80\x05bogus", 0)
    response = post(app, data)
    assert response.status_int == 200
    (record,) = all_failures()
    assert record.state == FailureState.DEAD
    assert "cannot load payload of gone.module.fn" in record.message
    assert "written by Python 3.11" in record.message
    assert failures.get_payload(record.id) == data


def test_other_exception_is_500_with_traceback_then_resolved(app):
    data = serialize(fail_until, 2)
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
    assert post(app, serialize(fail_with, ValueError("x")), headers=headers).status_int == 500
    (record,) = all_failures()
    assert record.state == FailureState.DEAD
    assert failures.get_payload(record.id)


def test_per_task_retry_limit_is_enforced_before_running(app):
    data = gae_deferred.envelope.build(record_run, (), {}, retry={"task_retry_limit": 1})
    assert post(app, data, headers={**TASK, "X-AppEngine-TaskRetryCount": "1"}).status_int == 200
    assert len(RUNS) == 1
    response = post(app, data, headers={**TASK, "X-AppEngine-TaskRetryCount": "2"})
    assert response.status_int == 200
    assert len(RUNS) == 1
    (record,) = all_failures()
    assert record.state == FailureState.DEAD and "retry limit 1" in record.message


def test_failure_record_text_is_bounded(app):
    post(app, serialize(fail_with, ValueError("m" * 100_000)))
    (record,) = all_failures()
    assert len(record.message) <= 4000


# --- spilled payloads -------------------------------------------------------------------------


def spill(obj, *args):
    """Store a payload the way defer() does, returning the reference envelope."""
    data = serialize(obj, *args)
    header = gae_deferred.envelope.read_header(data)
    payload_id = spillover.new_payload_id()
    spec = TaskSpec(
        queue="default",
        url="/_ah/queue/deferred",
        headers={},
        eta=spillover.now(),
        name=f"d-{payload_id}",
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
    spillover.write(record, chunks)
    return record, _reference(record)


def test_spilled_success_deletes_record_and_chunks(app, rpc_counter):
    big = "x" * 3_000_000
    record, reference = spill(record_run, big)
    assert record.chunks >= 1
    rpc_counter.clear()
    assert post(app, reference).status_int == 200
    assert RUNS[0][0] == (big,)
    assert rpc_counter == {"lookup": 1, "commit": 1}
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
    assert rpc_counter == {"lookup": 1, "commit": 1}


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


def test_spilled_payload_missing_is_200_and_permanent(app):
    record, reference = spill(record_run, "x")
    spillover.delete(record.id, record.chunks)
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
    assert post(app, serialize(fail_with, ValueError("a"))).status_int == 500
    (record,) = all_failures()
    headers = {
        "X-AppEngine-QueueName": "default",
        "X-AppEngine-TaskName": "other",
        "X-Deferred-Failure-Id": record.id,
    }
    assert post(app, serialize(record_run), headers=headers).status_int == 200
    (record,) = all_failures()
    assert record.state == FailureState.RESOLVED


def test_failure_records_are_per_task(app):
    post(app, serialize(fail_with, ValueError("a")))
    post(
        app,
        serialize(fail_with, ValueError("b")),
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
            return worker.submit(lambda: post(app, serialize(obj)).status_int).result()

        assert run_task(bump_counter, 200) == 200
        Counter(id="c", value=10).put()  # changed behind the worker's context cache
        assert run_task(bump_counter, 200) == 200
        assert run_task(bump_then_fail, 500) == 500
        assert run_task(bump_counter, 200) == 200
    assert RUNS == [1, 11, 12, 13]


def test_unreadable_queue_yaml_costs_only_dead_letter_detection(app, tmp_path, caplog):
    from gae_deferred import execution

    broken = tmp_path / "queue.yaml"
    broken.write_text("queue:\n- name: default\n  rate: 5/x\n")
    gae_deferred.configure(queue_yaml=str(broken))
    execution._queue_retry_limits.cache_clear()
    headers = {**TASK, "X-AppEngine-TaskRetryCount": "50"}
    with caplog.at_level(logging.ERROR, logger="gae_deferred"):
        assert post(app, serialize(fail_with, ValueError("x")), headers=headers).status_int == 500
    assert "queue.yaml:3" in caplog.text
    assert all_failures()[0].state == FailureState.RETRYING
    execution._queue_retry_limits.cache_clear()


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

    data = gae_deferred.envelope.build(record_run, (), {}, retry={"task_age_limit": 60})
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
