"""What the suites that run real emulators share: the stack, pointing this process at it, polling.

The e2e, browser and reliability conftests build their fixtures from these::

    stack = stack_fixture("stack", queue_yaml=QUEUE_YAML)

    @pytest.fixture
    def e2e(stack, monkeypatch):
        with pointed_at(stack, monkeypatch):
            yield stack

Unit tests that only need Cloud Tasks use the in-process emulator instead (conftest.py's
``tasks_emulator`` and ``fresh_tasks_emulator`` fixtures are built on it)::

    with cloud_tasks_emulator() as emulator:
        defer(add, 1)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from gae_deferred.local.stack import LocalStack

if TYPE_CHECKING:
    from gae_deferred.local.cloudtasks import CloudTasksEmulator

ROOT = pathlib.Path(__file__).resolve().parent.parent
T = TypeVar("T")
DATASTORE_CHOICES = ("builtin", "firestore", "datastore")
#: The Datastore emulator of this run's stacks (``pytest --datastore``, set by conftest.py).
DATASTORE = "builtin"


@contextlib.contextmanager
def started_stack(base_dir: pathlib.Path, **options: Any) -> Iterator[LocalStack]:
    """This repository's app (app.yaml) on free ports, state under ``base_dir``; stopped on exit.

    ``options`` go to LocalStack as they are (``queue_yaml``, ``extra_pythonpath``, ``workers``);
    the Datastore emulator is the run's (``pytest --datastore``) unless ``datastore`` says.
    """
    options.setdefault("datastore", DATASTORE)
    local = LocalStack(
        ROOT / "app.yaml", base_dir, app_port=0, datastore_port=0, tasks_port=0, **options
    )
    local.start()
    try:
        yield local
    finally:
        local.stop()


def stack_fixture(dir_name: str, **options: Any) -> Any:
    """A session fixture yielding ``started_stack`` on a fresh tmp dir named ``dir_name``.

    The fixture takes the name it is assigned to in a conftest::

        rel_stack = stack_fixture("reliability-stack", queue_yaml=QUEUE_YAML)
    """

    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
        with started_stack(tmp_path_factory.mktemp(dir_name), **options) as local:
            yield local

    return fixture


def clear_clients() -> None:
    """Forget gae_deferred's cached settings and clients, so the next use reads the environment."""
    import gae_deferred

    gae_deferred.reset_clients()


@contextlib.contextmanager
def pointed_at(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStack]:
    """This process's gae_deferred talks to ``stack`` (as after ``. .local/env``) while open.

    The environment goes back when ``monkeypatch`` undoes its changes, after the test.
    """
    # tests/conftest.py sets a key for unit tests; it would win over the stack's key file.
    monkeypatch.delenv("GAE_DEFERRED_SIGNING_KEY", raising=False)
    for name, value in stack.env.items():
        # The stack's PYTHONPATH is for its children; this process already has its own.
        if name != "PYTHONPATH":
            monkeypatch.setenv(name, value)
    clear_clients()
    try:
        yield stack
    finally:
        clear_clients()


@contextlib.contextmanager
def cloud_tasks_emulator(
    queue_yaml: pathlib.Path = ROOT / "queue.yaml",
    oidc_port: int | None = None,
) -> Iterator[CloudTasksEmulator]:
    """An in-process Cloud Tasks emulator on a free port with ``queue_yaml``'s queues (and an
    OIDC issuer for HTTP-target tasks on ``oidc_port``, when given).

    While open, CLOUD_TASKS_EMULATOR_HOST points at it and gae_deferred's client is fresh;
    on exit the emulator stops and the variable gets its previous value back.
    """
    from gae_deferred import cloud_tasks
    from gae_deferred.local.cloudtasks import CloudTasksEmulator

    emulator = CloudTasksEmulator(
        host="127.0.0.1",
        port=0,
        data_dir=None,
        queue_yaml=str(queue_yaml),
        project="test-project",
        location="us-central1",
        # Nothing listens there: tests pause queues when they need tasks to stay put.
        app_url="http://127.0.0.1:9",
        # HTTP-target tasks go to their own URL; their tokens need the issuer (0: any port).
        oidc_port=oidc_port,
    ).start()
    previous = os.environ.get("CLOUD_TASKS_EMULATOR_HOST")
    os.environ["CLOUD_TASKS_EMULATOR_HOST"] = f"127.0.0.1:{emulator.port}"
    cloud_tasks.reset_client()
    try:
        yield emulator
    finally:
        emulator.stop()
        if previous is None:
            os.environ.pop("CLOUD_TASKS_EMULATOR_HOST")
        else:
            os.environ["CLOUD_TASKS_EMULATOR_HOST"] = previous
        cloud_tasks.reset_client()


def wait_for(
    predicate: Callable[[], T], what: str, timeout: float = 20.0, interval: float = 0.1
) -> T:
    """Poll until ``predicate()`` is truthy and return it; fail naming ``what`` on timeout.

    ``wait_for(lambda: queued_tasks("default"), "a queued task")`` returns the task list.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def holds_for(
    predicate: Callable[[], object], what: str, seconds: float, interval: float = 0.05
) -> None:
    """Poll ``predicate()`` until an explicit deadline ``seconds`` from now; fail naming ``what``
    the moment it is false. For "nothing happened" assertions: a single check after a sleep
    sees one instant; this sees the whole window, and says when it broke.

    ``holds_for(lambda: runs(run_dir, "paused") == [], "the paused task not to run", 1.0)``
    """
    started = time.monotonic()
    deadline = started + seconds
    while True:
        if not predicate():
            raise AssertionError(f"{what}: broken after {time.monotonic() - started:.2f}s")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


@contextlib.contextmanager
def datastore() -> Iterator[None]:
    """An ndb context on gae_deferred's client (the stack's Datastore emulator).

    ``with datastore(): record = spillover.get(payload_id)``
    """
    from gae_deferred._datastore import client

    with client().context(cache_policy=False, global_cache_policy=False):
        yield


def queued_tasks(queue: str) -> list[Any]:
    """Tasks Cloud Tasks still holds in a queue (``queued_tasks("default") == []``)."""
    from gae_deferred.cloud_tasks import client as tasks_client, queue_path

    return list(tasks_client().list_tasks(parent=queue_path(queue)))
