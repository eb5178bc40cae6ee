"""Shared test setup: a signing key and a fresh configuration per test; the session's Chromium."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from tests.browser import chromium as chromium_finder

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_SIGNING_KEY = "5e" * 32

# Set before gae_deferred reads the environment; tests that need other values use configure().
os.environ.setdefault("GAE_DEFERRED_SIGNING_KEY", TEST_SIGNING_KEY)
os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "test-project")
# Tests flush task metrics themselves (metrics.flush()); a background flush in the middle of a
# test that counts Datastore RPCs would add its transaction to the count.
os.environ.setdefault("GAE_DEFERRED_METRICS_FLUSH_SECONDS", "3600")
os.environ.setdefault("GAE_DEFERRED_METRICS_FIRST_FLUSH_SECONDS", "3600")


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Every test starts from the environment's settings, whatever the last one configured."""
    import gae_deferred._config as config

    config.reset()
    yield
    config.reset()


def _serve_inequality_order_once() -> None:
    """Fix the stub's index check for a range sorted by its own property (Datastore's rule: the
    inequality property is the first sort order, one column of the index). inmemory-datastore-
    stub 1.1.0 wants that column twice and refuses (facets =, seen_desc <=, order seen_desc),
    which index (facets, seen_desc) serves on Datastore and on our emulator."""
    from dataclasses import replace

    from inmemory_datastore_stub._indexes import QueryShape

    original = QueryShape.is_served_by
    if getattr(original, "inequality_order_once", False):
        return

    def is_served_by(shape, index):
        first = shape.orders[0][0] if shape.orders else None
        if first in shape.inequality_properties:
            rest = [name for name in shape.inequality_properties if name != first]
            shape = replace(shape, inequality_properties=rest)
        return original(shape, index)

    is_served_by.inequality_order_once = True
    QueryShape.is_served_by = is_served_by


@pytest.fixture
def ndb_stub():
    """An in-memory Datastore (inmemory-datastore-stub) that validates our index.yaml.

    Yields the stub client; gae_deferred is configured to use it and a context is open.
    """
    from inmemory_datastore_stub import Client

    import gae_deferred

    _serve_inequality_order_once()
    client = Client(project="test-project", index_yaml=str(ROOT / "index.yaml"))
    gae_deferred.configure(ndb_client=client, queue_yaml=str(ROOT / "queue.yaml"))
    with client.context():
        yield client


@pytest.fixture
def ndb_emulator(monkeypatch):
    """Like ``ndb_stub``, on the local Datastore emulator (gRPC, in this process).

    Use it where the stub falls short: the stub fails any transaction during which anything
    else was written, the emulator checks conflicts per entity as Datastore does.
    """
    from google.cloud import ndb

    import gae_deferred
    from gae_deferred.local.datastore import DatastoreEmulator

    with DatastoreEmulator(port=0, index_yaml=ROOT / "index.yaml") as emulator:
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{emulator.port}")
        client = ndb.Client(project="test-project")
        gae_deferred.configure(ndb_client=client, queue_yaml=str(ROOT / "queue.yaml"))
        with client.context(cache_policy=False, global_cache_policy=False):
            yield client


@pytest.fixture(scope="session")
def tasks_emulator():
    """One in-process Cloud Tasks emulator with queue.yaml's queues for the whole session.

    CLOUD_TASKS_EMULATOR_HOST points at it while it runs; tests pause the queues they use
    (``paused``), since nothing listens at its app URL.
    """
    from tests.stack_support import cloud_tasks_emulator

    with cloud_tasks_emulator() as emulator:
        yield emulator


@pytest.fixture
def fresh_tasks_emulator():
    """A Cloud Tasks emulator of this test's own: queues running and empty, as created from
    queue.yaml (the dashboard tests pause, resume and purge them)."""
    from tests.stack_support import cloud_tasks_emulator

    with cloud_tasks_emulator() as emulator:
        yield emulator


PAUSED_QUEUES = ("default", "reports")


@pytest.fixture
def paused(tasks_emulator, ndb_stub):
    """queue.yaml's queues paused and empty; yields ``tasks(queue="default")``, which returns
    a queue's tasks in full (bodies included)."""
    yield from _paused_queues()


@pytest.fixture
def paused_on_emulator(tasks_emulator, ndb_emulator):
    """``paused``, with Datastore on the local emulator (per-entity transaction conflicts)."""
    yield from _paused_queues()


def _paused_queues():
    import gae_deferred
    from gae_deferred import cloud_tasks

    for queue in PAUSED_QUEUES:
        cloud_tasks.pause_queue(queue)
        cloud_tasks.purge_queue(queue)
    # A test that changed CLOUD_TASKS_EMULATOR_HOST may have left another client cached.
    gae_deferred.cloud_tasks.reset_client()

    def tasks(queue="default"):
        tasks_page, _ = cloud_tasks.list_tasks_page(queue, page_size=1000, full=True)
        return tasks_page

    yield tasks
    for queue in PAUSED_QUEUES:
        cloud_tasks.purge_queue(queue)


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless chromium for the session, the one ``make test`` found or installed
    (``tests/browser/chromium.py``, exported as ``GAE_DEFERRED_CHROMIUM``; a plain ``pytest``
    looks for one itself). One per session: Playwright's sync API runs one instance a thread.
    """
    from playwright.sync_api import sync_playwright

    try:
        path = chromium_finder.find()
    except chromium_finder.NoChromium as exc:
        pytest.fail(str(exc), pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        # The browser that was found, not some other one.
        assert chromium.version.split(".")[0] in (chromium_finder.version(path) or "")
        try:
            yield chromium
        finally:
            chromium.close()


class CommitSpy:
    """The Commit requests the in-memory Datastore serves (``requests``), and ``fail_when``:
    a function of a request that returns an exception to raise instead of committing it."""

    def __init__(self) -> None:
        self.requests: list = []
        self.fail_when = None

    def kinds(self) -> list[list[str]]:
        """Per Commit, the kinds of the entities it wrote."""
        return [
            [m._pb.upsert.key.path[-1].kind for m in request.mutations] for request in self.requests
        ]

    def chunk_bytes(self) -> list[int]:
        """Per Commit, the payload-chunk bytes it carried."""
        return [
            sum(len(m._pb.upsert.properties["data"].blob_value) for m in request.mutations)
            for request in self.requests
        ]

    def deletes(self, request) -> bool:
        return any(m._pb.WhichOneof("operation") == "delete" for m in request.mutations)


@pytest.fixture
def datastore_commits(ndb_stub):
    """Watch, and fail on demand, the Commit RPCs of ``ndb_stub``'s Datastore."""
    spy = CommitSpy()
    wrapper = ndb_stub.stub.commit
    original = wrapper.func

    def commit(request, *args, **kwargs):
        spy.requests.append(request)
        error = spy.fail_when(request) if spy.fail_when else None
        if error is not None:
            raise error
        return original(request, *args, **kwargs)

    wrapper.func = commit
    yield spy
    wrapper.func = original
