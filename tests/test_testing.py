"""gae_deferred.testing: capture_tasks() and the deferred_tasks pytest fixture.

The capture replaces testbed's taskqueue stub: tasks are kept instead of sent, then run
in-process through execute_task, as the task handler runs them.
"""

from __future__ import annotations

import base64
import datetime
import io
import os
import re
import subprocess
import sys
import textwrap
import unittest

import pytest
from google.cloud import ndb

import gae_deferred
from gae_deferred import (
    ConfigurationError,
    PermanentTaskFailure,
    QueueNotFoundError,
    SingularTaskFailure,
    TaskAlreadyExistsError,
    cloud_tasks,
    defer,
    spillover,
)
from gae_deferred.testing import UnexaminedTaskFailures, capture_tasks
from tests.fixtures import ROOT

RUNS: list = []


class CaptureCounter(ndb.Model):
    count = ndb.IntegerProperty(default=0)


def note(*args):
    RUNS.append(
        (
            *args,
            gae_deferred.task_name(),
            gae_deferred.queue_name(),
            gae_deferred.task_retry_count(),
        )
    )


def fan_out(n):
    note("fan_out", n)
    if n:
        defer(fan_out, n - 1)


def fail_until(attempts):
    note("fail_until")
    if gae_deferred.task_retry_count() < attempts:
        raise ZeroDivisionError(f"attempt {gae_deferred.task_retry_count()}")


def give_up(reason):
    raise PermanentTaskFailure(reason)


def ask_again():
    note("ask_again")
    raise SingularTaskFailure()


def forever():
    defer(forever)


def bump(counter_id, data=b""):
    counter = CaptureCounter.get_by_id(counter_id)
    counter.count += 1
    counter.put()


@ndb.transactional()
def create_and_defer(counter_id, fail=False):
    CaptureCounter(id=counter_id).put()
    defer(bump, counter_id, _transactional=True)
    if fail:
        raise RuntimeError("rolled back")


@pytest.fixture(autouse=True)
def _clear_runs():
    RUNS.clear()


@pytest.fixture
def no_signing_key(monkeypatch):
    monkeypatch.delenv("GAE_DEFERRED_SIGNING_KEY", raising=False)
    monkeypatch.delenv("GAE_DEFERRED_SIGNING_KEY_FILE", raising=False)
    monkeypatch.delenv("DATASTORE_EMULATOR_HOST", raising=False)
    gae_deferred.reset_clients()


# --- capturing ------------------------------------------------------------------------------


def test_captured_task_describes_what_cloud_tasks_would_get():
    before = datetime.datetime.now(datetime.UTC)
    with capture_tasks() as queue:
        created = defer(fan_out, 3, _countdown=30, _headers={"X-Trace": "t1"})
        [task] = queue.tasks
    assert (task.name, created.name) == ("task1", "task1")
    assert task.queue == task.queue_name == "default"
    assert task.function == f"{__name__}.fan_out" and task.args == "3"
    assert task.url == f"/_ah/queue/deferred/{__name__}.fan_out"
    assert task.headers["X-Trace"] == "t1" and task.method == "POST"
    assert 29 < (task.eta - before).total_seconds() < 35
    assert not task.spilled and task.payload_id is None
    assert task.size == created.task_bytes and task.payload_bytes == created.payload_bytes


def test_capture_takes_http_target_tasks_too():
    gae_deferred.configure(
        http_target=gae_deferred.HttpTarget(
            "https://worker-abc123-ew.a.run.app", "tasks@p.iam.gserviceaccount.com"
        )
    )
    with capture_tasks() as queue:
        defer(fan_out, 1)
        [task] = queue.tasks
        assert task.url == f"/_ah/queue/deferred/{__name__}.fan_out" and task.routing == {}
        assert task.function == f"{__name__}.fan_out"
        assert queue.run_all() == 2
    assert [run[:2] for run in RUNS] == [("fan_out", 1), ("fan_out", 0)]


def test_run_all_runs_the_tasks_tasks_defer_until_none_is_left():
    with capture_tasks() as queue:
        defer(fan_out, 3, _countdown=30)
        assert queue.run_all() == 4
        assert queue.tasks == []
    assert [run[:2] for run in RUNS] == [("fan_out", n) for n in (3, 2, 1, 0)]
    # Each ran as its own task, with the task context the handler gives it.
    assert [run[2:] for run in RUNS] == [(f"task{n}", "default", 0) for n in (1, 2, 3, 4)]


def test_tasks_run_by_eta_then_creation_order():
    with capture_tasks() as queue:
        defer(note, "later", _countdown=60)
        defer(note, "now")
        defer(note, "also now")
        queue.run_all()
    assert [run[0] for run in RUNS] == ["now", "also now", "later"]


def test_tasks_of_one_queue(tmp_path):
    with capture_tasks(queue_yaml=ROOT / "queue.yaml") as queue:
        defer(note, "report", _queue="reports")
        defer(note, "default")
        assert [task.function for task in queue.tasks_in("reports")] == [f"{__name__}.note"]
        assert queue.run_all(queue="reports") == 1
        assert [task.queue for task in queue.tasks] == ["default"]
        queue.run(queue.tasks[0])
    assert [run[:3] for run in RUNS] == [
        ("report", "task1", "reports"),
        ("default", "task2", "default"),
    ]


def test_unknown_queue_is_refused_when_queue_yaml_is_known():
    with capture_tasks(queue_yaml=ROOT / "queue.yaml") as queue:
        with pytest.raises(QueueNotFoundError, match="'nope' does not exist"):
            defer(note, _queue="nope")
        assert queue.tasks == []


def test_a_task_name_is_refused_again_until_the_queue_is_cleared():
    with capture_tasks() as queue:
        defer(note, "first", _name="nightly")
        with pytest.raises(TaskAlreadyExistsError, match="nightly"):
            defer(note, "second", _name="nightly")
        queue.run_all()
        with pytest.raises(TaskAlreadyExistsError):
            defer(note, "after it ran", _name="nightly")
        queue.clear()
        defer(note, "after clear", _name="nightly")
        assert [task.name for task in queue.tasks] == ["nightly"]


def test_transactional_defer_is_captured_only_if_the_transaction_commits():
    with capture_tasks() as queue:
        with pytest.raises(RuntimeError, match="rolled back"):
            create_and_defer("c1", fail=True)
        assert queue.tasks == []
        create_and_defer("c2")
        [task] = queue.tasks
        assert task.spilled  # transactional defers are written with the transaction
        queue.run_all()
        assert CaptureCounter.get_by_id("c2").count == 1
        assert spillover.get(task.payload_id) is None


# --- settings -------------------------------------------------------------------------------


def test_works_without_signing_key_project_or_datastore(no_signing_key, monkeypatch):
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    with capture_tasks() as queue:
        assert gae_deferred.settings().project == "testbed-test"
        defer(bump, "big", os.urandom(300_000))  # random bytes: does not compress, spills
        [task] = queue.tasks
        assert task.spilled and spillover.get(task.payload_id) is not None
        CaptureCounter(id="big").put()
        queue.run_all()
        assert CaptureCounter.get_by_id("big").count == 1
        assert spillover.get(task.payload_id) is None
    # The test key and the in-memory Datastore were only for the block.
    with pytest.raises(ConfigurationError, match="no signing key"):
        defer(note)
    assert ndb.get_context(raise_context_error=False) is None


def test_every_setting_and_the_sink_are_restored_on_exit():
    gae_deferred.configure(spill_threshold=50_000)
    before = gae_deferred.settings()
    with pytest.raises(KeyError), capture_tasks():
        gae_deferred.configure(spill_threshold=1_000, default_queue="other")
        raise KeyError("the block fails")
    assert gae_deferred.settings() is before
    assert cloud_tasks._sink is None


def test_uses_the_configured_datastore(ndb_stub):
    with capture_tasks() as queue:
        assert queue.ndb_client is ndb_stub
        task = defer(note, os.urandom(300_000))
    # Still there after the block: it was written to the configured Datastore.
    assert spillover.get(task.payload_id) is not None


def test_the_emulator_of_datastore_emulator_host_gets_an_ndb_context_too(monkeypatch):
    """As for the in-memory Datastore, the block opens the context an app's tests expect."""
    from gae_deferred.local.datastore import DatastoreEmulator

    with DatastoreEmulator(port=0) as emulator:
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", emulator.address)
        gae_deferred.reset_clients()
        with capture_tasks() as queue:
            task = defer(note, os.urandom(300_000))
            assert spillover.get(task.payload_id) is not None
            queue.run_all()
        assert ndb.get_context(raise_context_error=False) is None
        assert emulator.rpc_counts["Commit"] >= 1
    gae_deferred.reset_clients()


def test_index_yaml_only_applies_to_the_in_memory_datastore(ndb_stub):
    with (
        pytest.raises(ConfigurationError, match="in-memory Datastore"),
        capture_tasks(index_yaml=ROOT / "index.yaml"),
    ):
        pass


def test_missing_in_memory_datastore_is_a_clear_error(no_signing_key, monkeypatch):
    # Without the testing extra's packages, the Datastore emulator module cannot import.
    monkeypatch.setitem(sys.modules, "gae_deferred.local.datastore", None)
    with pytest.raises(ConfigurationError, match=r"wheel.s \[testing\] extra"), capture_tasks():
        pass
    assert cloud_tasks._sink is None


def test_captures_do_not_nest():
    with (
        capture_tasks(),
        pytest.raises(ConfigurationError, match="do not nest"),
        capture_tasks(),
    ):
        pass


def test_the_test_sees_what_tasks_wrote_despite_its_ndb_cache():
    with capture_tasks() as queue:
        CaptureCounter(id="cached").put()
        assert CaptureCounter.get_by_id("cached").count == 0  # now in the test's context cache
        defer(bump, "cached")
        queue.run_all()
        assert CaptureCounter.get_by_id("cached").count == 1


# --- failures -------------------------------------------------------------------------------


def test_a_failing_task_raises_its_exception_and_is_retried_like_cloud_tasks():
    with capture_tasks() as queue:
        defer(fail_until, 1)
        with pytest.raises(ZeroDivisionError, match="attempt 0"):
            queue.run_all()
        [task] = queue.tasks
        assert (task.retry_count, task.execution_count) == (1, 1)
        queue.run_all()
        assert queue.tasks == []
    assert [run[-1] for run in RUNS] == [0, 1]


def test_a_permanent_failure_is_kept_for_the_test_to_take():
    with capture_tasks() as queue:
        defer(give_up, "account gone")
        defer(note, "next")
        assert queue.run_all() == 2  # the permanent failure does not stop the others
        [failure] = queue.take_failures()
        assert failure.state == "permanent"
        assert isinstance(failure.exception, PermanentTaskFailure)
        assert str(failure.exception) == "account gone"
        assert failure.task.function.endswith("give_up")
        assert queue.failures == ()
    assert [run[0] for run in RUNS] == ["next"]


def test_a_permanent_failure_nobody_took_fails_the_block():
    with (
        pytest.raises(UnexaminedTaskFailures, match="account gone") as raised,
        capture_tasks() as queue,
    ):
        defer(give_up, "account gone")
        queue.run_all()
    assert "give_up" in str(raised.value) and "take_failures()" in str(raised.value)
    assert cloud_tasks._sink is None


def test_singular_failure_is_retried_quietly_until_the_queue_gives_up(ndb_stub):
    # queue.yaml: the default queue allows 5 retries.
    with capture_tasks() as queue:
        defer(ask_again)
        assert queue.run_all() == 6
        [failure] = queue.take_failures()
    assert failure.state == "dead" and isinstance(failure.exception, SingularTaskFailure)
    assert [run[-1] for run in RUNS] == [0, 1, 2, 3, 4, 5]


def test_a_failure_on_the_last_allowed_attempt_is_raised_and_not_retried():
    with capture_tasks() as queue:
        defer(fail_until, 5, _retry_options={"task_retry_limit": 1})
        for attempt in (0, 1):
            with pytest.raises(ZeroDivisionError, match=f"attempt {attempt}"):
                queue.run_all()
        assert queue.tasks == [] and queue.failures == ()


def test_run_all_stops_a_task_that_defers_itself_forever():
    with capture_tasks() as queue:
        defer(forever)
        with pytest.raises(RuntimeError, match="ran 25 tasks and 1 are still queued"):
            queue.run_all(max_tasks=25)
        with pytest.raises(ValueError, match="max_tasks"):
            queue.run_all(max_tasks=0)


def test_run_refuses_a_task_that_is_not_queued():
    with capture_tasks() as queue:
        defer(note, "once")
        [task] = queue.tasks
        queue.run(task)
        with pytest.raises(ValueError, match="task1 is not queued"):
            queue.run(task)


# --- testbed's names ------------------------------------------------------------------------


def test_testbed_names_work_on_deferred_tasks():
    with capture_tasks(queue_yaml=ROOT / "queue.yaml") as queue:
        defer(note, "one", _name="task-one", _queue="reports", _url="/tasks/one")
        defer(note, "two")
        assert len(queue.get_filtered_tasks()) == 2
        [one] = queue.get_filtered_tasks(name="task-one")
        assert one.queue_name == "reports"
        assert queue.get_filtered_tasks(queue_names="reports") == [one]
        assert len(queue.get_filtered_tasks(queue_names=["reports", "default"])) == 2
        assert queue.get_filtered_tasks(url=one.url) == [one]
        gae_deferred.run(one.payload)

        [two] = queue.GetTasks("default")
        assert (two["name"], two["queue_name"], two["method"]) == ("task1", "default", "POST")
        assert ("X-AppEngine-TaskName", "task1") in two["headers"]
        gae_deferred.run(base64.b64decode(two["body"]))
        queue.FlushQueue("default")
        assert [task.name for task in queue.tasks] == ["task-one"]
    assert [run[0] for run in RUNS] == ["one", "two"]


# --- the pytest fixture ---------------------------------------------------------------------


def test_deferred_tasks_fixture_needs_no_import(tmp_path):
    (tmp_path / "test_app.py").write_text(
        textwrap.dedent(
            """
            from gae_deferred import PermanentTaskFailure, defer

            DONE = []

            def work(n):
                DONE.append(n)

            def give_up():
                raise PermanentTaskFailure("gone for good")

            def test_runs_deferred_work(deferred_tasks):
                defer(work, 1)
                assert deferred_tasks.tasks[0].function == "test_app.work"
                deferred_tasks.run_all()
                assert DONE == [1]

            def test_untaken_failure_fails_at_teardown(deferred_tasks):
                defer(give_up)
                deferred_tasks.run_all()
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAE_DEFERRED_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "2 passed, 1 error" in result.stdout, result.stdout + result.stderr
    assert "gone for good" in result.stdout


def test_the_plugin_module_is_cheap_to_import():
    # pytest imports it in every run of every project that has gae-deferred installed.
    script = (
        "import sys, gae_deferred.pytest_plugin\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "gae_deferred" in loaded
    assert not {"google", "cloudpickle", "grpc", "webapp2"} & set(loaded)


def test_the_after_example_of_docs_testing_md_passes(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "testing.md").read_text(), re.S)
    before, after = blocks[0], blocks[1]
    assert "testbed" in before and "capture_tasks" in after
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "queue.yaml").write_text("queue:\n- name: default\n  rate: 5/s\n")
    namespace = {"__name__": "docs_testing_example", "__file__": str(tmp_path / "example_test.py")}
    exec(compile(after, "docs/testing.md", "exec"), namespace)
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(namespace["TaskQueueTestCase"])
    result = unittest.TextTestRunner(stream=io.StringIO()).run(suite)
    assert result.testsRun == 1 and result.wasSuccessful(), result.errors + result.failures
