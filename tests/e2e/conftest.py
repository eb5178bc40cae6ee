"""End-to-end fixtures: one LocalStack (both emulators + gunicorn) per test session.

Tests defer from this process into the stack, exactly as a second shell would after
``. .local/env``::

    def test_something(e2e, run_dir):
        task = defer(e2e_tasks.record, str(run_dir), "label")
        e2e_helpers.wait_for_runs(run_dir, "label", 1)
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from gae_deferred.local.stack import LocalStack
from tests.stack_support import pointed_at, stack_fixture

E2E_DIR = pathlib.Path(__file__).resolve().parent
QUEUE_YAML = E2E_DIR / "queue.yaml"


# Test queues, and tests/e2e importable by the app.
stack = stack_fixture("stack", queue_yaml=QUEUE_YAML, extra_pythonpath=[E2E_DIR])


@pytest.fixture
def e2e(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStack]:
    """The running stack, with this process's gae_deferred pointed at it for one test."""
    with pointed_at(stack, monkeypatch):
        yield stack


@pytest.fixture
def run_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """Where tasks of this test write their run files (the app runs on this machine)."""
    path = tmp_path / "runs"
    path.mkdir()
    return path
