"""Every Datastore RPC within 4 MiB, both ways, and Datastore errors that say what happened.

Datastore, and Google's Firestore (Datastore mode) and legacy Datastore emulators, refuse any
request over 4,194,304 bytes ("gRPC message exceeds maximum size"; the legacy one resets the
stream). Spills of 5, 9 and 20 MiB and transactional spills are stored and run here on
Google's Firestore emulator, its legacy Datastore emulator and ours, through a recording gRPC
proxy that measures every request and response.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from concurrent import futures

import grpc
import hypothesis
import pytest
import webapp2
import webtest
from google.api_core import exceptions as api_exceptions
from google.cloud import ndb
from hypothesis import strategies as st

import gae_deferred
from gae_deferred import (
    ConfigurationError,
    DatastoreRefusedError,
    DatastoreUnavailableError,
    EnqueueOutcomeUnknown,
    _ndb_rpc,
    cloud_tasks,
    defer,
    spillover,
)
from gae_deferred._config import DATASTORE_REQUEST_LIMIT
from gae_deferred.webapp2 import deferred_routes

MIB = 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_INDEX = os.path.join(ROOT, "index.yaml")
RESULTS: list = []


def collect(*args):
    RESULTS.append(args)


class RpcOrder(ndb.Model):
    total = ndb.IntegerProperty()


@pytest.fixture(autouse=True)
def _fresh_results():
    RESULTS.clear()


# --- a recording proxy in front of a Datastore emulator ------------------------------------------

_METHODS = (
    "Lookup",
    "RunQuery",
    "RunAggregationQuery",
    "BeginTransaction",
    "Commit",
    "Rollback",
    "AllocateIds",
    "ReserveIds",
)
_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class DatastoreProxy:
    """A gRPC server forwarding Datastore calls, as bytes, to ``target`` and recording each
    one's method and request and response sizes. It accepts any size itself, so a request too
    big for Datastore reaches the emulator behind it and is refused there."""

    def __init__(self, target: str) -> None:
        self.calls: list[tuple[str, int, int | None]] = []
        self._channel = grpc.insecure_channel(target, options=_UNLIMITED)
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(self._forward(name)) for name in _METHODS
        }
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_UNLIMITED)
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("google.datastore.v1.Datastore", handlers)]
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _forward(self, method: str):
        upstream = self._channel.unary_unary(f"/google.datastore.v1.Datastore/{method}")

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = [
                (key, value)
                for key, value in context.invocation_metadata()
                if key == "x-goog-request-params"
            ]
            try:
                response = upstream(request, metadata=metadata)
            except grpc.RpcError as error:
                self.calls.append((method, len(request), None))
                context.abort(error.code(), error.details())
            self.calls.append((method, len(request), len(response)))
            return response

        return forward

    def count(self, method: str) -> int:
        return sum(1 for name, _, _ in self.calls if name == method)

    def largest(self) -> tuple[int, int]:
        """The largest request and the largest response seen."""
        return (
            max(size for _, size, _ in self.calls),
            max(size or 0 for _, _, size in self.calls),
        )

    def close(self) -> None:
        self._server.stop(None)
        self._channel.close()


@pytest.fixture(scope="module")
def legacy_emulator(tmp_path_factory):
    """Google's legacy Datastore emulator (``--require_indexes``, data in memory)."""
    from gae_deferred.local import google_datastore

    reason = google_datastore.unavailable_reason("datastore")
    if reason is not None:
        pytest.fail(reason, pytrace=False)
    with google_datastore.GoogleDatastoreEmulator(
        "datastore",
        data_dir=tmp_path_factory.mktemp("google-datastore"),
        project="test-project",
        index_yaml=ROOT_INDEX,
        store_on_disk=False,
    ) as emulator:
        yield emulator


@pytest.fixture(params=["ours", "google-firestore", "google-datastore"])
def spill_datastore(request, monkeypatch, tasks_emulator) -> Iterator[DatastoreProxy]:
    """Datastore on our emulator, Google's Firestore emulator (Datastore mode) or Google's
    legacy Datastore emulator, behind a DatastoreProxy; the queues paused and empty. Yields
    the proxy."""
    with contextlib.ExitStack() as stack:
        if request.param == "ours":
            from gae_deferred.local.datastore import DatastoreEmulator

            ours = stack.enter_context(DatastoreEmulator(port=0, index_yaml=ROOT_INDEX))
            target = f"127.0.0.1:{ours.port}"
        else:
            name = "firestore" if request.param == "google-firestore" else "legacy"
            google = request.getfixturevalue(f"{name}_emulator")
            google.reset()
            target = google.address
        proxy = DatastoreProxy(target)
        stack.callback(proxy.close)
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{proxy.port}")
        client = ndb.Client(project="test-project")
        gae_deferred.configure(
            ndb_client=client, compression_level=0, queue_yaml=os.path.join(ROOT, "queue.yaml")
        )
        stack.enter_context(client.context(cache_policy=False, global_cache_policy=False))
        cloud_tasks.reset_client()
        cloud_tasks.pause_queue("default")
        cloud_tasks.purge_queue("default")
        yield proxy
        cloud_tasks.purge_queue("default")


def queued() -> list:
    tasks, _ = cloud_tasks.list_tasks_page("default", page_size=100, full=True)
    return tasks


def run_queued(task) -> int:
    """Deliver a queued task to the handler as Cloud Tasks would; the HTTP status."""
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    request = task.app_engine_http_request
    headers = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": task.name.split("/")[-1]}
    return app.post(
        request.relative_uri, request.body, headers=headers, expect_errors=True
    ).status_int


def _commits_for(envelope_bytes: int) -> int:
    """Spill commits of an envelope: three 1 MB chunks a commit, the record with the last."""
    chunks = -(-envelope_bytes // 1_000_000)
    return -(-chunks // 3)


@pytest.mark.parametrize("size", [5 * MIB, 9 * MIB, 20 * MIB])
def test_spill_stores_and_runs_with_every_rpc_within_4_mib(spill_datastore, size):
    data = os.urandom(size)
    result = defer(collect, data)
    assert result.spilled
    # 5 MiB: 6 chunks, 2 commits; 9 MiB: 10 chunks, 4; 20 MiB: 21 chunks, 7.
    assert spill_datastore.count("Commit") == _commits_for(result.stored_bytes)
    assert spillover.DeferredPayloadWrite.query().fetch() == []
    (task,) = queued()
    assert run_queued(task) == 200
    assert [(data,)] == RESULTS
    request, response = spill_datastore.largest()
    assert request <= DATASTORE_REQUEST_LIMIT and response <= DATASTORE_REQUEST_LIMIT
    assert spillover.get(result.payload_id) is None


@pytest.mark.parametrize("size", [300_000, 5 * MIB])
def test_transactional_spill_stores_and_runs_with_every_rpc_within_4_mib(spill_datastore, size):
    data = os.urandom(size)

    @ndb.transactional()
    def place():
        RpcOrder(id="o1", total=1).put()
        return defer(collect, data, _transactional=True)

    result = place()
    if size > MIB:
        # Over commit_bytes: the chunks went first, in commits of their own (2), the
        # transaction's commit wrote the record, and one more deleted the write marker.
        assert spill_datastore.count("Commit") == 4
    else:
        assert spill_datastore.count("Commit") == 1
    assert spillover.DeferredPayloadWrite.query().fetch() == []
    (task,) = queued()
    assert run_queued(task) == 200
    assert [(data,)] == RESULTS
    request, response = spill_datastore.largest()
    assert request <= DATASTORE_REQUEST_LIMIT and response <= DATASTORE_REQUEST_LIMIT
    assert spillover.get(result.payload_id) is None


def test_rolled_back_transactional_spill_leaves_chunks_the_sweeper_deletes(spill_datastore):
    @ndb.transactional()
    def place():
        RpcOrder(id="o2", total=1).put()
        defer(collect, os.urandom(5 * MIB), _transactional=True)
        raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        place()
    assert queued() == [] and RpcOrder.get_by_id("o2") is None
    assert spillover.DeferredPayload.query().fetch() == []
    (marker,) = spillover.DeferredPayloadWrite.query().fetch()
    assert len(spillover.DeferredPayloadChunk.query().fetch(keys_only=True)) == 6
    # Within the hour the write may still be going on: nothing is deleted.
    assert gae_deferred.sweep().purged_unfinished == 0
    later = spillover.now() + spillover.WRITE_GRACE + datetime.timedelta(minutes=1)
    assert gae_deferred.sweep(now=later).purged_unfinished == 1
    assert spillover.DeferredPayloadChunk.query().fetch(keys_only=True) == []
    assert spillover.DeferredPayloadWrite.query().fetch() == []
    assert marker.chunks == 6


def test_crash_between_spill_commits_leaves_chunks_the_sweeper_deletes(paused, datastore_commits):
    """The process dies after the first commit of a payload: its chunks and write marker stay
    (no record, so nothing lists or runs them) until the sweeper deletes them."""
    gae_deferred.configure(compression_level=0)
    datastore_commits.fail_when = lambda request: (
        api_exceptions.PermissionDenied("the process died")
        if len(datastore_commits.requests) >= 2
        else None
    )
    with pytest.raises(DatastoreRefusedError, match="the process died"):
        defer(collect, b"\3" * 5_000_000)
    datastore_commits.fail_when = None
    assert spillover.DeferredPayload.query().fetch() == []
    assert len(spillover.DeferredPayloadChunk.query().fetch(keys_only=True)) == 3
    (marker,) = spillover.DeferredPayloadWrite.query().fetch()
    later = marker.started + spillover.WRITE_GRACE + datetime.timedelta(seconds=1)
    report = gae_deferred.sweep(now=later)
    assert report.purged_unfinished == 1 and report.reenqueued == 0
    assert spillover.DeferredPayloadChunk.query().fetch(keys_only=True) == []
    assert spillover.DeferredPayloadWrite.query().fetch() == []
    assert paused() == []


def test_every_commit_of_a_batch_stays_within_commit_bytes(paused, datastore_commits):
    """Many payloads of odd sizes sharing commits: no request over commit_bytes, each record
    in the commit of its last chunk or later, a payload spanning commits marked until then."""
    gae_deferred.configure(compression_level=0)
    sizes = [2_999_000, 1_000_001, 200_000, 3_500_000, 700_000, 4_000_000]
    with gae_deferred.batch() as b:
        for number, size in enumerate(sizes):
            b.defer(collect, bytes([number]) * size)
    assert max(datastore_commits.request_bytes()) <= gae_deferred.settings().commit_bytes
    kinds = datastore_commits.kinds()
    assert sum(commit.count("_DeferredPayload") for commit in kinds) == len(sizes)
    assert sum(commit.count("_DeferredPayloadWrite") for commit in kinds) == sum(
        commit.count("-_DeferredPayloadWrite") for commit in kinds
    )
    assert spillover.DeferredPayloadWrite.query().fetch() == []
    assert len(paused()) == len(sizes)


# --- commit_bytes ---------------------------------------------------------------------------------


def test_commit_bytes_over_4_mib_is_refused_with_a_clear_error():
    with pytest.raises(ConfigurationError, match=r"at most|between .* and 4,194,304"):
        gae_deferred.configure(commit_bytes=64 * MIB)
    with pytest.raises(ConfigurationError, match="4,194,304"):
        gae_deferred.configure(commit_bytes=DATASTORE_REQUEST_LIMIT + 1)
    with pytest.raises(ConfigurationError, match="one chunk"):
        gae_deferred.configure(commit_bytes=1_000_000)
    with pytest.raises(ConfigurationError, match="commit_bytes"):
        gae_deferred.configure(commit_bytes="3MiB")
    assert gae_deferred.configure(commit_bytes=DATASTORE_REQUEST_LIMIT).commit_bytes == (
        DATASTORE_REQUEST_LIMIT
    )


def test_commit_bytes_of_4_mib_fills_requests_to_the_limit(paused, datastore_commits):
    gae_deferred.configure(compression_level=0, commit_bytes=DATASTORE_REQUEST_LIMIT)
    defer(collect, b"\1" * 9_000_000)
    # Four 1 MB chunks a commit: 10 chunks in 3 commits, each request under 4 MiB.
    assert len(datastore_commits.requests) == 3
    assert 4_000_000 < max(datastore_commits.request_bytes()) <= DATASTORE_REQUEST_LIMIT


# --- errors that say what happened ----------------------------------------------------------------


@contextlib.contextmanager
def _answering(monkeypatch, code: grpc.StatusCode, message: str) -> Iterator[list[int]]:
    """Datastore as a gRPC server whose Commit always fails with ``code``; yields the sizes of
    the Commit requests it got."""
    calls: list[int] = []

    def commit(request: bytes, context) -> bytes:
        calls.append(len(request))
        context.abort(code, message)

    handlers = {"Commit": grpc.unary_unary_rpc_method_handler(commit)}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("google.datastore.v1.Datastore", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(_ndb_rpc, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    try:
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{port}")
        client = ndb.Client(project="test-project")
        gae_deferred.configure(ndb_client=client, compression_level=0)
        yield calls
    finally:
        server.stop(None)


def test_size_error_is_not_retried_and_says_what_it_is(monkeypatch):
    """What Google's emulators answer a request over 4 MiB: raised at once, as what it is."""
    message = "gRPC message exceeds maximum size 4194304: 4194305"
    with _answering(monkeypatch, grpc.StatusCode.RESOURCE_EXHAUSTED, message) as calls:
        with pytest.raises(DatastoreRefusedError, match=r"refused.*exceeds maximum size") as raised:
            defer(collect, b"\0" * 300_000)
        assert len(calls) == 1
        assert isinstance(raised.value.__cause__, api_exceptions.ResourceExhausted)
        assert not isinstance(raised.value, DatastoreUnavailableError)


def test_invalid_argument_is_not_retried(monkeypatch):
    message = 'The value of property "data" is longer than 1048487 bytes.'
    with _answering(monkeypatch, grpc.StatusCode.INVALID_ARGUMENT, message) as calls:
        with pytest.raises(DatastoreRefusedError, match="longer than 1048487 bytes"):
            defer(collect, b"\0" * 300_000)
        assert len(calls) == 1


def test_transient_error_is_retried_then_settled(monkeypatch):
    """UNAVAILABLE is retried on ndb's schedule; after the last try the commit may still have
    landed (the reply, not the request, may be what was lost), and this server cannot be read
    back either: the outcome is unknown, never 'refused' or 'not stored'."""
    with _answering(monkeypatch, grpc.StatusCode.UNAVAILABLE, "try again") as calls:
        with pytest.raises(EnqueueOutcomeUnknown, match=r"may have been applied \(503 try again"):
            defer(collect, b"\0" * 300_000)
        assert len(calls) == 1 + len(_ndb_rpc.RETRY_DELAYS)


def test_refusal_is_told_from_an_error_that_may_pass():
    """What defer() calls DatastoreRefusedError: Datastore answered no, not 'no answer'."""
    assert _ndb_rpc.is_refusal(api_exceptions.InvalidArgument("bad key"))
    assert _ndb_rpc.is_refusal(api_exceptions.PermissionDenied("no"))
    assert _ndb_rpc.is_refusal(
        api_exceptions.ResourceExhausted("Sent message larger than max (5000000 vs. 4194304)")
    )
    assert not _ndb_rpc.is_refusal(api_exceptions.ResourceExhausted("Quota exceeded"))
    assert not _ndb_rpc.is_refusal(api_exceptions.DeadlineExceeded("late"))
    assert not _ndb_rpc.is_refusal(api_exceptions.ServiceUnavailable("reset"))
    retried = api_exceptions.RetryError("3 retries", api_exceptions.ServiceUnavailable("reset"))
    assert not _ndb_rpc.is_refusal(retried)
    assert _ndb_rpc.is_refusal(api_exceptions.RetryError("x", api_exceptions.InvalidArgument("k")))


def test_quota_exhaustion_stays_transient():
    """RESOURCE_EXHAUSTED for a quota is worth retrying; for a message's size it is not."""
    assert _ndb_rpc.is_transient(api_exceptions.ResourceExhausted("Quota exceeded"))
    assert not _ndb_rpc.is_transient(
        api_exceptions.ResourceExhausted("Sent message larger than max (5000000 vs. 4194304)")
    )
    assert not _ndb_rpc.is_transient(api_exceptions.InvalidArgument("bad key"))
    assert _ndb_rpc.is_transient(api_exceptions.ServiceUnavailable("down"))


def test_payload_chunks_are_capped_so_their_delete_is_one_commit():
    """A spilled task that ran deletes its record and every chunk in one Commit (500 mutations
    at most): settings that would cut a payload into more chunks are refused."""
    with pytest.raises(ConfigurationError, match=r"at most 490 chunks.*at least 68,479"):
        gae_deferred.configure(chunk_bytes=60_000)
    gae_deferred.configure(chunk_bytes=68_479)
    gae_deferred.configure(chunk_bytes=10_000, max_payload_bytes=4_900_000)


# --- how commits are planned ----------------------------------------------------------------------


def _plan(
    sizes: list[int], *, records: bool, chunk_bytes: int, commit_bytes: int, header_chars: int
) -> list:
    """``spillover._commits`` of payloads of ``sizes`` bytes (records with an args preview of
    ``header_chars``), as (kind, payload id, op) per mutation per commit, and each commit's
    request size."""
    gae_deferred.configure(chunk_bytes=chunk_bytes, commit_bytes=commit_bytes)
    payloads = [
        spillover.build_record(
            f"p{number}",
            bytes(size),
            {"function": "f", "raw_bytes": size, "args": "a" * header_chars},
            queue="default",
            task_name=f"t{number}",
            eta=spillover.now(),
            task={"url": "/u"},
        )
        for number, size in enumerate(sizes)
    ]
    head = len(_ndb_rpc.request_head(ndb.get_context().client))
    plan = []
    for batch in spillover._commits(payloads, records=records):
        mutations = []
        for mutation in batch:
            key = mutation.key
            payload = key.parent().id() if key.parent() else key.id()
            mutations.append((key.kind(), payload, "delete" if mutation.delete else "upsert"))
        plan.append((mutations, head + sum(mutation.size for mutation in batch)))
    return plan


# Planning writes nothing: the stub only lends its client (project) and context to every input.
@hypothesis.settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(
    # Each payload: whole chunks and a few bytes more or less, so that chunks and records
    # land right at the edges of commits.
    shapes=st.lists(
        st.tuples(st.integers(0, 3), st.integers(-4_000, 4_000)), min_size=1, max_size=6
    ),
    chunk_bytes=st.sampled_from([68_479, 100_000, 250_000]),
    commit_bytes=st.sampled_from([None, 0, 90_000, 400_000]),
    records=st.booleans(),
    header_chars=st.integers(0, 3_000),
)
def test_commits_stay_within_commit_bytes_and_write_each_record_last(
    ndb_stub, shapes, chunk_bytes, commit_bytes, records, header_chars
):
    sizes = [max(1, whole * chunk_bytes + more) for whole, more in shapes]
    # commit_bytes: the least allowed for the chunk size, or that plus some.
    commit_bytes = chunk_bytes + 2048 + (commit_bytes or 0)
    plan = _plan(
        sizes,
        records=records,
        chunk_bytes=chunk_bytes,
        commit_bytes=commit_bytes,
        header_chars=header_chars,
    )
    assert all(size <= commit_bytes and len(m) <= 500 for m, size in plan)
    for number in range(len(sizes)):
        payload = f"p{number}"
        commits = [index for index, (m, _) in enumerate(plan) if any(p == payload for _, p, _ in m)]
        ops = [(kind, op) for m, _ in plan for kind, p, op in m if p == payload]
        chunks = -(-sizes[number] // chunk_bytes)
        assert ops.count(("_DeferredPayloadChunk", "upsert")) == chunks
        first = plan[commits[0]][0]
        marked = ("_DeferredPayloadWrite", payload, "upsert") in first
        if not records:
            # The record comes later, in the caller's transaction: always marked, at once.
            assert marked and ops.count(("_DeferredPayloadWrite", "upsert")) == 1
            assert ("_DeferredPayload", "upsert") not in ops
            continue
        last = plan[commits[-1]][0]
        # The record in the last commit of its payload, after every chunk.
        assert ("_DeferredPayload", payload, "upsert") in last
        assert ops.index(("_DeferredPayload", "upsert")) > max(
            index for index, op in enumerate(ops) if op[0] == "_DeferredPayloadChunk"
        )
        spans = len(commits) > 1
        # A payload spanning commits is marked from its first commit to its record's.
        assert marked is spans
        assert (("_DeferredPayloadWrite", payload, "delete") in last) is spans
        assert ops.count(("_DeferredPayloadWrite", "upsert")) == int(spans)


def test_marker_left_by_a_committed_transaction_goes_and_its_chunks_stay(paused_on_emulator):
    """The write markers of a transactional spill are deleted after its commit; if that fails,
    the sweeper deletes the marker alone: the record the transaction wrote keeps its chunks."""
    gae_deferred.configure(compression_level=0)
    data = os.urandom(4 * MIB)

    def refused(*args, **kwargs):
        raise api_exceptions.ServiceUnavailable("datastore went away")

    @ndb.transactional()
    def place():
        RpcOrder(id="o3", total=1).put()
        return defer(collect, data, _transactional=True)

    with pytest.MonkeyPatch.context() as patch:
        # The deletes after the commit fail (chunks are written by commit_mutations).
        patch.setattr(_ndb_rpc, "commit", refused)
        result = place()
    (marker,) = spillover.DeferredPayloadWrite.query().fetch()
    assert marker.key.id() == result.payload_id
    later = spillover.now() + spillover.WRITE_GRACE + datetime.timedelta(minutes=1)
    assert spillover.purge_unfinished(later, 10) == 1
    assert spillover.DeferredPayloadWrite.query().fetch() == []
    assert spillover.get(result.payload_id) is not None
    (task,) = paused_on_emulator()
    assert run_queued(task) == 200
    assert [(data,)] == RESULTS


def _busy_series(name: str, now: float, rnd) -> ndb.Model:
    """A stored function series with a full hour of minutes and 7 days of hours of big,
    varied counts: the largest a series gets (about 39 KB)."""
    from gae_deferred import metrics

    def slot() -> list:
        buckets = [rnd.randint(0, 10**5) for _ in range(len(metrics.BUCKETS_MS) + 1)]
        runs, ok = rnd.randint(10**5, 10**6), rnd.randint(10**5, 10**6)
        return [runs, ok, rnd.randint(0, 10**5), rnd.randint(0, 10**5), rnd.random() * 6e5, buckets]

    minute = int(now // 60)
    series = metrics.Series(
        "function",
        name,
        ["default"],
        None,
        None,
        {m: slot() for m in range(minute - 59, minute)},
        {h: slot() for h in range(minute // 60 - 167, minute // 60)},
    )
    record = metrics.DeferredMetricSeries(key=metrics.series_key("function", name))
    series.to_record(record, now)
    return record


def test_metrics_flush_of_many_busy_series_stays_within_4_mib(datastore_commits):
    """A flush reads and writes its series in transactions of at most 64: each Lookup and
    Commit under 4 MiB even when every series is as big as they get."""
    import random
    import time

    from gae_deferred import metrics

    rnd = random.Random(23)
    now = time.time()
    names = [f"busy.fn{number}" for number in range(110)]
    stored = [_busy_series(name, now, rnd) for name in names]
    for start in range(0, len(stored), 25):
        ndb.put_multi(stored[start : start + 25])
    responses: list[int] = []
    # The stub's Lookup, measured as datastore_commits measures its Commit.
    lookup = ndb.get_context().client.stub.lookup
    original = lookup.func

    def measured(request, *args, **kwargs):
        response = original(request, *args, **kwargs)
        responses.append(type(response).pb(response).ByteSize())
        return response

    lookup.func = measured
    datastore_commits.requests.clear()
    metrics.discard_pending()
    try:
        for name in names:
            metrics.observe(name, "default", 0.01, ok=True, retried=False)
        assert metrics.flush() == len(names) + 2
    finally:
        lookup.func = original
    assert len(datastore_commits.requests) == 2  # 112 series, 64 a transaction
    assert max(datastore_commits.request_bytes()) <= DATASTORE_REQUEST_LIMIT
    assert max(responses) <= DATASTORE_REQUEST_LIMIT
    assert sum(datastore_commits.request_bytes()) > DATASTORE_REQUEST_LIMIT
    assert metrics.get_series("function", "busy.fn7").window("1h").runs > 10**5
