"""The pytest plugin of the gae-deferred distribution: the ``deferred_tasks`` fixture.

pytest loads this module in every run where gae-deferred is installed, so it imports nothing
heavy: gae_deferred.testing (ndb, Cloud Tasks types) is imported when a test asks for the
fixture::

    def test_signup_sends_welcome(deferred_tasks):
        signup("a@example.com")
        [task] = deferred_tasks.tasks_in("mail")
        deferred_tasks.run_all()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from gae_deferred.testing import TaskQueue


@pytest.fixture
def deferred_tasks() -> Iterator[TaskQueue]:
    """``capture_tasks()`` for one test: tasks are captured, not sent, and run on demand.

    At teardown, tasks that failed for good and were not taken with ``take_failures()`` fail
    the test.
    """
    from gae_deferred.testing import capture_tasks

    with capture_tasks() as queue:
        yield queue
