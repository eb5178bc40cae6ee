"""testbed's taskqueue stub calls on a capture: the names and signatures of the legacy SDK's
``taskqueue_stub.TaskQueueServiceStub`` (1.9.88) that test suites call: ``GetQueues()``,
``GetTasks(queue_name)``, ``DeleteTask(queue_name, task_name)``, ``FlushQueue(queue_name)``,
``Clear()``, ``get_filtered_tasks(url=None, name=None, queue_names=None)``."""

from __future__ import annotations

import inspect
import re

import pytest

import gae_deferred as deferred
from gae_deferred.testing import TaskQueue, UnexaminedTaskFailures, capture_tasks
from tests.callables import add
from tests.fixtures import ROOT

QUEUE_YAML = ROOT / "queue.yaml"
LEGACY_SIGNATURES = {
    "GetQueues": [],
    "GetTasks": ["queue_name"],
    "DeleteTask": ["queue_name", "task_name"],
    "FlushQueue": ["queue_name"],
    "Clear": [],
    "get_filtered_tasks": ["url", "name", "queue_names"],
}


@pytest.mark.parametrize(("name", "params"), sorted(LEGACY_SIGNATURES.items()))
def test_stub_methods_keep_the_legacy_signatures(name, params):
    signature = inspect.signature(getattr(TaskQueue, name))
    assert list(signature.parameters)[1:] == params


class ChainTestHelper:
    """What a task-chaining library's legacy test helper did with testbed's stub."""

    def __init__(self, stub):
        self.stub = stub

    def drop(self, queue_name):
        for task in self.stub.GetTasks(queue_name):
            self.stub.DeleteTask(queue_name, task["name"])

    def counts(self):
        return {queue["name"]: queue["tasks_in_queue"] for queue in self.stub.GetQueues()}


def boom():
    raise deferred.PermanentTaskFailure("nothing to do")


def test_delete_task_drops_one_task_and_frees_its_name():
    with capture_tasks(queue_yaml=QUEUE_YAML) as stub:
        deferred.defer(add, 1, _name="first")
        deferred.defer(add, 2, _name="second", _queue="reports")
        stub.DeleteTask("default", "first")
        stub.DeleteTask("default", "no-such-task")
        assert [task.name for task in stub.get_filtered_tasks()] == ["second"]
        # No tombstone, as the stub's DeleteTask left none: the name is free again.
        deferred.defer(add, 3, _name="first")
        assert [task.name for task in stub.get_filtered_tasks(queue_names="default")] == ["first"]


def test_a_legacy_helper_on_the_capture():
    with capture_tasks(queue_yaml=QUEUE_YAML) as stub:
        helper = ChainTestHelper(stub)
        deferred.defer(add, 1)
        deferred.defer(add, 2, _queue="reports", _countdown=60)
        assert helper.counts() == {"default": 1, "reports": 1}
        (reports,) = [queue for queue in stub.GetQueues() if queue["name"] == "reports"]
        assert reports["mode"] == "push" and reports["max_rate"]
        assert reports["retry_parameters"]["retry_limit"] >= 0
        assert re.fullmatch(r"\d+:\d\d:\d\d from now", reports["eta_delta"])
        assert re.fullmatch(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d", reports["oldest_task"])
        helper.drop("reports")
        assert helper.counts()["reports"] == 0
        with pytest.raises(KeyError):
            stub.GetTasks("not-a-queue")
        stub.Clear()
        assert stub.get_filtered_tasks() == []


def test_get_queues_without_queue_yaml_lists_default_and_queues_with_tasks():
    deferred.configure(queue_yaml="")
    with capture_tasks() as stub:
        assert [queue["name"] for queue in stub.GetQueues()] == ["default"]
        deferred.defer(add, 1, _queue="elsewhere")
        assert [queue["name"] for queue in stub.GetQueues()] == ["default", "elsewhere"]
        (default,) = [queue for queue in stub.GetQueues() if queue["name"] == "default"]
        assert "retry_parameters" not in default and default["tasks_in_queue"] == 0
        stub.FlushQueue("elsewhere")


def test_a_swallowed_permanent_failure_needs_one_line():
    # Legacy tests ran a task whose PermanentTaskFailure the handler logged and dropped.
    swallowed = capture_tasks(queue_yaml=QUEUE_YAML)
    with pytest.raises(UnexaminedTaskFailures, match="nothing to do"), swallowed as stub:
        deferred.defer(boom)
        stub.run_all()
    # The one-line fix docs/testing.md gives: take (or assert on) the failure.
    with capture_tasks(queue_yaml=QUEUE_YAML) as stub:
        deferred.defer(boom)
        stub.run_all()
        stub.take_failures()
