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

from emulators.stack import LocalStack

E2E_DIR = pathlib.Path(__file__).resolve().parent
QUEUE_YAML = E2E_DIR / "queue.yaml"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The stack on free ports, state in a tmp dir, test queues, tests/e2e importable by the app."""
    local = LocalStack(
        tmp_path_factory.mktemp("stack"),
        app_port=0,
        datastore_port=0,
        tasks_port=0,
        queue_yaml=QUEUE_YAML,
        extra_pythonpath=[E2E_DIR],
    )
    local.start()
    try:
        yield local
    finally:
        local.stop()


def _clear_clients() -> None:
    from gae_deferred import _config, _datastore, _tasks_client

    _config.reset()
    _tasks_client.tasks_client.cache_clear()
    _datastore._default_client.cache_clear()


@pytest.fixture
def e2e(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStack]:
    """The running stack, with this process's gae_deferred pointed at it for one test."""
    # tests/conftest.py sets a key for unit tests; it would win over the stack's key file.
    monkeypatch.delenv("GAE_DEFERRED_SIGNING_KEY", raising=False)
    for name, value in stack.env.items():
        if name != "PYTHONPATH":
            monkeypatch.setenv(name, value)
    _clear_clients()
    yield stack
    _clear_clients()


@pytest.fixture
def run_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """Where tasks of this test write their run files (the app runs on this machine)."""
    path = tmp_path / "runs"
    path.mkdir()
    return path
