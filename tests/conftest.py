"""Shared test setup: a signing key and a fresh configuration per test; the session's Chromium."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from tests import google_legs, stack_support
from tests.browser import chromium as chromium_finder
from tests.fixtures import ROOT

TEST_SIGNING_KEY = "5e" * 32

# Set before gae_deferred reads the environment; tests that need other values use configure().
os.environ.setdefault("GAE_DEFERRED_SIGNING_KEY", TEST_SIGNING_KEY)
os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "test-project")
# Tests flush task metrics themselves (metrics.flush()); a background flush in the middle of a
# test that counts Datastore RPCs would add its transaction to the count.
os.environ.setdefault("GAE_DEFERRED_METRICS_FLUSH_SECONDS", "3600")
os.environ.setdefault("GAE_DEFERRED_METRICS_FIRST_FLUSH_SECONDS", "3600")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--datastore",
        choices=stack_support.DATASTORE_CHOICES,
        default="builtin",
        help="the Datastore the stacks and the ndb_stub/ndb_emulator fixtures use: builtin "
        "(ours), firestore (Google's Firestore emulator in Datastore mode) or datastore "
        "(Google's legacy emulator); see tests/google_legs.py",
    )


def pytest_configure(config: pytest.Config) -> None:
    stack_support.DATASTORE = config.getoption("datastore")


_LEFT_OUT = pytest.StashKey[dict[str, str]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On Google's emulators (``--datastore`` not builtin) run only tests that reach Datastore,
    less those tests/google_legs.py names; the named ones are listed at the end. On ours, the
    tests of Google's emulators leave (named, with what to install) where they cannot run."""
    mode = config.getoption("datastore")
    keep, drop, named = [], [], {}
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        reason = google_legs.left_out(mode, item.nodeid, fixtures)
        if reason is not None:
            named[item.nodeid] = reason
            drop.append(item)
        elif mode == "builtin" or google_legs.reaches_datastore(item.nodeid, fixtures):
            keep.append(item)
        else:
            drop.append(item)
    config.stash[_LEFT_OUT] = named
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    named = config.stash.get(_LEFT_OUT, {})
    if named:
        mode = config.getoption("datastore")
        terminalreporter.section(f"left out of the --datastore={mode} run (tests/google_legs.py)")
        for nodeid, reason in named.items():
            terminalreporter.write_line(f"{nodeid}: {reason}")


@pytest.fixture(autouse=True)
def _capture_on_google_emulator(request, monkeypatch):
    """On Google's emulators, capture_tasks() in the capture modules uses the run's emulator
    (it follows DATASTORE_EMULATOR_HOST), emptied for each test."""
    if stack_support.DATASTORE == "builtin" or not request.node.nodeid.startswith(
        google_legs.CAPTURE_MODULES
    ):
        yield
        return
    emulator = request.getfixturevalue("google_emulator")
    emulator.reset()
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", emulator.address)
    import gae_deferred

    gae_deferred.reset_clients()
    yield
    gae_deferred.reset_clients()


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Every test starts from the environment's settings, whatever the last one configured."""
    import gae_deferred._config as config

    config.reset()
    yield
    config.reset()
    # Refused deliveries a test provoked are not written at exit, nowhere in particular.
    refused = sys.modules.get("gae_deferred.refusals")
    if refused is not None:
        refused.discard_pending()


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
def ndb_stub(request, monkeypatch):
    """An in-memory Datastore (inmemory-datastore-stub) that validates our index.yaml.

    Yields the stub client; gae_deferred is configured to use it and a context is open.
    With ``--datastore firestore|datastore``: an ndb client on Google's emulator, emptied first.
    """
    from inmemory_datastore_stub import Client

    import gae_deferred

    if stack_support.DATASTORE != "builtin":
        yield from _on_google_emulator(request.getfixturevalue("google_emulator"), monkeypatch)
        return
    _serve_inequality_order_once()
    client = Client(project="test-project", index_yaml=str(ROOT / "index.yaml"))
    gae_deferred.configure(ndb_client=client, queue_yaml=str(ROOT / "queue.yaml"))
    with client.context():
        yield client


@pytest.fixture
def ndb_emulator(request, monkeypatch):
    """Like ``ndb_stub``, on the local Datastore emulator (gRPC, in this process).

    Use it where the stub falls short: the stub fails any transaction during which anything
    else was written, the emulator checks conflicts per entity as Datastore does.
    """
    from google.cloud import ndb

    import gae_deferred
    from gae_deferred.local.datastore import DatastoreEmulator

    if stack_support.DATASTORE != "builtin":
        emulator = request.getfixturevalue("google_emulator")
        yield from _on_google_emulator(emulator, monkeypatch, cache_policy=False)
        return
    with DatastoreEmulator(port=0, index_yaml=ROOT / "index.yaml") as emulator:
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{emulator.port}")
        client = ndb.Client(project="test-project")
        gae_deferred.configure(ndb_client=client, queue_yaml=str(ROOT / "queue.yaml"))
        with client.context(cache_policy=False, global_cache_policy=False):
            yield client


def _on_google_emulator(emulator, monkeypatch, **context_options):
    """``ndb_stub``/``ndb_emulator`` on Google's emulator of the run (emptied for each test)."""
    from google.cloud import ndb

    import gae_deferred

    emulator.reset()
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", emulator.address)
    client = ndb.Client(project="test-project")
    gae_deferred.configure(ndb_client=client, queue_yaml=str(ROOT / "queue.yaml"))
    if context_options:
        context_options["global_cache_policy"] = False
    with client.context(**context_options):
        yield client


@pytest.fixture(scope="session")
def google_emulator(tmp_path_factory):
    """Google's emulator of ``--datastore`` for the in-process fixtures: data in memory (so
    it can be reset), the legacy one with ``--require_indexes`` and our index.yaml."""
    from gae_deferred.local import google_datastore

    mode = stack_support.DATASTORE
    reason = google_datastore.unavailable_reason(mode)
    if reason is not None:
        pytest.fail(reason, pytrace=False)
    emulator = google_datastore.GoogleDatastoreEmulator(
        mode,
        data_dir=tmp_path_factory.mktemp(f"google-{mode}"),
        project="test-project",
        index_yaml=ROOT / "index.yaml",
        store_on_disk=False,
    )
    with emulator:
        yield emulator


@pytest.fixture(scope="session")
def firestore_emulator(tmp_path_factory):
    """Google's Firestore emulator in Datastore mode for the session (a
    ``GoogleDatastoreEmulator``; ``.address`` is its host:port). Tests share it: use a
    namespace or kind of your own, or ``.reset()`` it. Fails in one line naming what to install
    when the SDK or Java is missing."""
    from gae_deferred.local import google_datastore

    reason = google_datastore.unavailable_reason("firestore")
    if reason is not None:
        pytest.fail(reason, pytrace=False)
    emulator = google_datastore.GoogleDatastoreEmulator(
        "firestore", data_dir=tmp_path_factory.mktemp("firestore-emulator"), project="test-project"
    )
    with emulator:
        yield emulator


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
        """Per Commit, the kinds of the entities it wrote ("-Kind" for a delete)."""
        return [
            [
                f"-{m._pb.delete.path[-1].kind}"
                if m._pb.WhichOneof("operation") == "delete"
                else m._pb.upsert.key.path[-1].kind
                for m in request.mutations
            ]
            for request in self.requests
        ]

    def request_bytes(self) -> list[int]:
        """Per Commit, the size of its request (Datastore refuses one over 4 MiB)."""
        return [request._pb.ByteSize() for request in self.requests]

    def chunk_bytes(self) -> list[int]:
        """Per Commit, the payload-chunk bytes it carried."""
        return [
            sum(
                len(m._pb.upsert.properties["data"].blob_value)
                for m in request.mutations
                # Not a delete's: reading a map entry of it would make the mutation an upsert.
                if m._pb.WhichOneof("operation") == "upsert" and "data" in m._pb.upsert.properties
            )
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
