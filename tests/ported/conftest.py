"""Fixtures the ported third-party tests (tests/ported/upstream) expect, on gae_deferred.

Legacy suites got a ``testbed`` fixture from their conftest, with ``testbed.taskqueue_stub`` for
the queued tasks and a Datastore stub behind ndb. Here the same fixture is one
``capture_tasks()``: its queue answers the taskqueue stub's calls (``get_filtered_tasks``,
``GetTasks``) and its in-memory Datastore has an ndb context open for the test.

tests/ported/upstream holds the third-party code itself; the tests in tests/ported are ours.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import pytest

from gae_deferred.testing import TaskQueue

PORTED = pathlib.Path(__file__).resolve().parent
UPSTREAM = PORTED / "upstream"
# The ported modules import each other by top-level name, as they did in their apps; the local
# stack's app gets the same two folders on its PYTHONPATH.
for folder in (PORTED, UPSTREAM):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@dataclasses.dataclass(frozen=True)
class Testbed:
    """What the legacy ``testbed`` fixture offered the tests that defer."""

    taskqueue_stub: TaskQueue


@pytest.fixture
def testbed(deferred_tasks: TaskQueue) -> Testbed:
    return Testbed(taskqueue_stub=deferred_tasks)


@pytest.fixture(autouse=True)
def _ported_apps_queue_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ported apps' own queues, as their tests found queue.yaml beside their app.yaml."""
    monkeypatch.setenv("GAE_DEFERRED_QUEUE_YAML", str(PORTED / "queue.yaml"))
