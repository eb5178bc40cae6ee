"""Reliability fixtures: one LocalStack (both emulators + gunicorn) for the reliability suites.

The stack runs tests/reliability/queue.yaml (fast queues, short backoffs) and has this folder
on the app's PYTHONPATH so the app can import ``rel_tasks``. Tests defer from this process into
the stack, as a second shell would after ``. .local/env``::

    def test_something(rel, log):
        defer(rel_tasks.mark, log, "t-1", _queue="fault")
        rel_helpers.wait_for_ids(log, {"t-1"})
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from gae_deferred.local.stack import LocalStack
from tests.stack_support import pointed_at, stack_fixture

REL_DIR = pathlib.Path(__file__).resolve().parent
QUEUE_YAML = REL_DIR / "queue.yaml"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything in this folder drives real processes or the real handler: mark it e2e."""
    for item in items:
        if REL_DIR in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


rel_stack = stack_fixture("reliability-stack", queue_yaml=QUEUE_YAML, extra_pythonpath=[REL_DIR])


@pytest.fixture
def rel(rel_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStack]:
    """The running stack, with this process's gae_deferred pointed at it for one test.

    A test that stops a child brings it back itself; this fixture only checks, afterwards,
    that every child is up again so one test's fault never leaks into the next.
    """
    with pointed_at(rel_stack, monkeypatch):
        yield rel_stack
    assert rel_stack.dead_children() == [], "a test left a stack child dead"
    assert set(rel_stack.pids()) == {"app", "cloudtasks", "datastore"}


@pytest.fixture
def log(tmp_path: pathlib.Path) -> str:
    """The file this test's tasks append their runs to (the app runs on this machine)."""
    return str(tmp_path / "runs.log")
