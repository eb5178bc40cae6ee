"""Fixtures the ported third-party tests (tests/ported/upstream) expect, on gae_deferred.

Legacy suites got a ``testbed`` fixture from their conftest, with ``testbed.taskqueue_stub`` for
the queued tasks and a Datastore stub behind ndb. Here the same fixture is one
``capture_tasks()``: its queue answers the taskqueue stub's calls (``get_filtered_tasks``,
``GetTasks``) and its in-memory Datastore has an ndb context open for the test.
"""

from __future__ import annotations

import dataclasses

import pytest

from gae_deferred.testing import TaskQueue


@dataclasses.dataclass(frozen=True)
class Testbed:
    """What the legacy ``testbed`` fixture offered the tests that defer."""

    taskqueue_stub: TaskQueue


@pytest.fixture
def testbed(deferred_tasks: TaskQueue) -> Testbed:
    return Testbed(taskqueue_stub=deferred_tasks)
