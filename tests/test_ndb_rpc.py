"""gae_deferred._ndb_rpc: the ndb internals it uses are still there, and its writes read back
through ndb exactly as ndb's own puts would."""

from __future__ import annotations

import contextlib
import datetime
import pathlib
import subprocess
import sys
import threading
import tomllib
from importlib import metadata

import pytest
from google.cloud import ndb
from packaging.specifiers import SpecifierSet

from gae_deferred import _datastore, _ndb_rpc, failures, spillover
from tests import stack_support

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _upgrade_message(what: str) -> str:
    return (
        f"{what}: gae_deferred._ndb_rpc was written against google-cloud-ndb "
        f"{_ndb_rpc.PINNED_NDB_VERSION} (installed: {metadata.version('google-cloud-ndb')}); "
        "re-read that ndb version's _datastore_api before changing the pin"
    )


def test_the_pins_and_the_supported_range_agree():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (
        f"google-cloud-ndb{_ndb_rpc.SUPPORTED_NDB_VERSIONS}" in pyproject["project"]["dependencies"]
    )
    pinned = f"google-cloud-ndb=={_ndb_rpc.PINNED_NDB_VERSION}"
    assert pinned in (ROOT / "requirements.txt").read_text().splitlines()
    supported = SpecifierSet(_ndb_rpc.SUPPORTED_NDB_VERSIONS)
    assert _ndb_rpc.PINNED_NDB_VERSION in supported
    assert metadata.version("google-cloud-ndb") in supported


def _import_with(change: str) -> subprocess.CompletedProcess[str]:
    """Import gae_deferred._ndb_rpc again (importlib.reload) after ``change`` to ndb's
    modules, in a process of its own: the reload must not replace this process's classes."""
    script = (
        "import importlib\n"
        "from google.cloud.ndb import _datastore_api, _retry\n"
        "from gae_deferred import _ndb_rpc\n"
        f"{change}\n"
        "try:\n"
        "    importlib.reload(_ndb_rpc)\n"
        "except _ndb_rpc.NdbInternalsChanged as exc:\n"
        "    print(type(exc).__mro__[1].__name__, exc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )


def test_an_ndb_without_an_internal_fails_the_import_with_what_to_pin():
    result = _import_with("del _datastore_api._get_commit_batch")
    message = result.stdout
    assert message.startswith("ImportError google-cloud-ndb internals changed: ")
    assert "google.cloud.ndb._datastore_api._get_commit_batch is missing" in message
    assert f"installed: {metadata.version('google-cloud-ndb')}" in message
    assert f"tested with google-cloud-ndb{_ndb_rpc.SUPPORTED_NDB_VERSIONS}" in message
    assert f"pin google-cloud-ndb=={_ndb_rpc.PINNED_NDB_VERSION}" in message


def test_an_internal_that_takes_other_parameters_fails_the_import():
    result = _import_with("_retry.is_transient_error = lambda exc: False")
    assert (
        "google.cloud.ndb._retry.is_transient_error takes (exc), expected (error, ...)"
        in result.stdout
    )


def test_the_installed_ndb_passes_the_import_check():
    assert _import_with("").stdout == ""


def test_ndb_commit_batch_shape_is_unchanged():
    from google.cloud.ndb import _datastore_api

    batch = _datastore_api._TransactionalCommitBatch(b"tx", _ndb_rpc._options.Options())
    assert batch.mutations == [] and batch.futures == [], _upgrade_message(
        "_TransactionalCommitBatch no longer keeps parallel mutations/futures lists"
    )


def _chunk(payload_id: str, number: int, data: bytes) -> spillover.DeferredPayloadChunk:
    return spillover.DeferredPayloadChunk(
        key=spillover.chunk_keys(payload_id, number)[-1], data=data
    )


def _stored(stub_client, key: ndb.Key):
    """The entity protobuf the stub holds for ``key``."""
    return stub_client.stub.store.get(key._key.to_protobuf(), None).entity


def _spilled(payload_id: str, data: bytes) -> tuple:
    """A record and its chunks for ``data``, not written."""
    return spillover.build_record(
        payload_id,
        data,
        {"function": "f", "raw_bytes": len(data)},
        queue="default",
        task_name="t",
        eta=spillover.now(),
        task={"url": "/u"},
    )


@contextlib.contextmanager
def _datastore_server(monkeypatch, handlers: dict, **client_options):
    """A real gRPC server answering Datastore methods with ``handlers`` (request bytes in,
    response bytes out); yields an ndb client pointed at it, inside its context."""
    from concurrent import futures

    import grpc

    methods = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in handlers.items()}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("google.datastore.v1.Datastore", methods)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{port}")
        client = ndb.Client(project="test-project", **client_options)
        with client.context(cache_policy=False, global_cache_policy=False):
            yield client
    finally:
        server.stop(None)


def test_commit_writes_what_ndb_put_writes(ndb_stub):
    record, chunks = _spilled("p-put", b"x" * 2_500_000)
    ndb.put_multi([record, *chunks])
    by_ndb = [_stored(ndb_stub, entity.key) for entity in (record, *chunks)]
    ndb.delete_multi([record.key, *(chunk.key for chunk in chunks)])

    _ndb_rpc.commit(upserts=[record, *chunks])
    assert [_stored(ndb_stub, entity.key) for entity in (record, *chunks)] == by_ndb
    loaded, data = spillover.load("p-put", 3)
    assert loaded == record and bytes(data) == b"x" * 2_500_000
    ndb.delete_multi([record.key, *(chunk.key for chunk in chunks)])

    # What write_many sends: each chunk's protobuf made straight from a view of the envelope.
    blobs = list(chunks.blobs())
    assert all(isinstance(blob.data, memoryview) for blob in blobs)
    _ndb_rpc.commit(upserts=[record, *blobs])
    assert [_stored(ndb_stub, entity.key) for entity in (record, *chunks)] == by_ndb


def test_commit_is_one_rpc_with_upserts_and_deletes(datastore_commits):
    _ndb_rpc.commit(upserts=[_chunk("p-del", 1, b"a"), _chunk("p-del", 2, b"b")])
    _ndb_rpc.commit(
        upserts=[_chunk("p-del", 3, b"c")],
        deletes=spillover.chunk_keys("p-del", 2),
    )
    seen = [
        [mutation._pb.WhichOneof("operation") for mutation in request.mutations]
        for request in datastore_commits.requests[1:]
    ]
    assert seen == [["upsert", "delete", "delete"]]
    assert [c and c.data for c in ndb.get_multi(spillover.chunk_keys("p-del", 3))] == [
        None,
        None,
        b"c",
    ]


class Thing(ndb.Model):
    name = ndb.StringProperty()


def test_joined_mutations_commit_with_the_transaction_and_keep_ndb_results_paired(ndb_emulator):
    @ndb.transactional()
    def work():
        _ndb_rpc.join_transaction(upserts=[_chunk("p-tx", 1, b"joined")])
        # A key Datastore allocates at commit: ndb pairs it with its future by position.
        return Thing(name="allocated").put()

    key = work()
    assert key.id() and key.get().name == "allocated"
    assert spillover.chunk_keys("p-tx", 1)[0].get().data == b"joined"


def test_joined_mutations_roll_back_with_the_transaction(ndb_emulator):
    @ndb.transactional()
    def work():
        _ndb_rpc.join_transaction(upserts=[_chunk("p-rb", 1, b"gone")])
        raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        work()
    assert spillover.chunk_keys("p-rb", 1)[0].get() is None


def test_join_transaction_outside_a_transaction_is_refused(ndb_stub):
    with pytest.raises(RuntimeError, match="active ndb transaction"):
        _ndb_rpc.join_transaction(upserts=[_chunk("p-none", 1, b"")])


def test_enter_and_exit_context_match_context_use(ndb_stub):
    """In a new thread (no active context), as gae_deferred's task contexts are entered."""
    context = ndb.context.Context(ndb_stub)
    seen = []

    def use_and_leave():
        _ndb_rpc.enter_context(context)
        seen.append((ndb.get_context(), ndb.context.get_toplevel_context()))
        _ndb_rpc.exit_context()
        seen.append(
            (
                ndb.get_context(raise_context_error=False),
                ndb.context.get_toplevel_context(raise_context_error=False),
            )
        )

    thread = threading.Thread(target=use_and_leave)
    thread.start()
    thread.join()
    assert seen == [(context, context), (None, None)], _upgrade_message(
        "ndb.context._state no longer holds the current and top-level contexts"
    )


def _failure(record_id: str) -> failures.DeferredFailure:
    return failures.update(
        None,
        record_id,
        function="m.f",
        exception_type="E",
        message="m",
        traceback="t",
        state=failures.FailureState.PERMANENT,
        task_name="t",
        queue="default",
        meta={"a": 1},
        payload_id=None,
        when=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
    )


def test_commit_stores_computed_properties_as_put_does(ndb_stub):
    """A fresh entity, never read: its ComputedProperty is stored by the commit itself."""
    _ndb_rpc.commit(upserts=[_failure("f-ours")])
    _failure("f-ndb").put()
    ours = _stored(ndb_stub, failures.failure_key("f-ours"))
    by_ndb = _stored(ndb_stub, failures.failure_key("f-ndb"))
    assert ours.properties["active"].boolean_value is True
    assert ours.properties == by_ndb.properties


def test_lookup_returns_raw_entities_in_key_order_and_none_for_missing(ndb_stub):
    _ndb_rpc.commit(upserts=[_chunk("p-lk", 1, b"one"), _chunk("p-lk", 3, b"three")])
    keys = spillover.chunk_keys("p-lk", 3)
    found = _ndb_rpc.lookup(keys)
    assert found[1] is None
    assert [pb.properties["data"].blob_value for pb in (found[0], found[2])] == [b"one", b"three"]
    assert _ndb_rpc.model_from_pb(found[2]) == ndb.get_multi(keys)[2]


def test_lookup_asks_again_for_keys_the_service_deferred(ndb_stub):
    _ndb_rpc.commit(upserts=[_chunk("p-df", 1, b"a"), _chunk("p-df", 2, b"b")])
    wrapper = ndb_stub.stub.lookup
    original = wrapper.func
    asked = []

    def deferring(request, *args, **kwargs):
        # As Datastore does when a response would be too big: the last key comes later.
        asked.append(len(request.keys))
        response = original(request, *args, **kwargs)
        if len(request.keys) > 1:
            last = response._pb.found[-1].entity.key
            response._pb.deferred.add().CopyFrom(last)
            del response._pb.found[-1]
        return response

    wrapper.func = deferring
    try:
        found = _ndb_rpc.lookup(spillover.chunk_keys("p-df", 2))
    finally:
        wrapper.func = original
    assert asked == [2, 1]
    assert [pb.properties["data"].blob_value for pb in found] == [b"a", b"b"]


def test_lookup_in_a_transaction_reads_in_it(ndb_emulator, monkeypatch):
    seen = []

    @ndb.transactional()
    def work():
        _ndb_rpc.lookup(spillover.chunk_keys("p-in-tx", 1))
        seen.append(ndb.get_context().transaction)

    original = _ndb_rpc._datastore_api.make_call

    def recording(name, request, *args, **kwargs):
        if name == "lookup":
            seen.append(request._pb.read_options.transaction)
        return original(name, request, *args, **kwargs)

    monkeypatch.setattr(_ndb_rpc._datastore_api, "make_call", recording)
    work()
    assert seen[0] and seen[0] == seen[1]


def test_payloads_read_back_through_a_channel_with_grpcs_default_receive_limit(ndb_emulator):
    """ndb's production channel (google.cloud._helpers.make_secure_channel) sets no message
    size options, so gRPC's default 4 MiB receive limit applies; only its emulator channel lifts
    it. The same limit here, on the emulator: every Lookup of a payload must come in under it."""
    import grpc
    from google.cloud.datastore_v1.services.datastore.transports import DatastoreGrpcTransport

    host = ndb_emulator.host
    ndb_emulator.stub = DatastoreGrpcTransport(host=host, channel=grpc.insecure_channel(host))
    for size in (3_900_000, 8 * 1024 * 1024, 20_000_000):
        payload_id = f"p-default-channel-{size}"
        data = bytes(range(256)) * (size // 256)
        record, chunks = _spilled(payload_id, data)
        spillover.write_many([(record, chunks)])
        loaded, read = spillover.load(payload_id, record.chunks, record.stored_bytes)
        assert loaded.key == record.key and bytes(read) == data


def test_commit_and_lookup_send_the_routing_header_ndb_sends(monkeypatch):
    """Datastore routes a named database's requests by ``x-goog-request-params``; a real gRPC
    server records what ndb's own put and get send, and what ours send."""
    from google.cloud.datastore_v1.types import datastore as datastore_pb2

    seen: dict[str, list] = {"Commit": [], "Lookup": []}

    def commit(request: bytes, context) -> bytes:
        seen["Commit"].append(dict(context.invocation_metadata()))
        mutations = datastore_pb2.CommitRequest.deserialize(request).mutations
        results = [{"version": 1} for _ in mutations]
        return datastore_pb2.CommitResponse.serialize({"mutation_results": results})

    def lookup(request: bytes, context) -> bytes:
        seen["Lookup"].append(dict(context.invocation_metadata()))
        keys = datastore_pb2.LookupRequest.deserialize(request).keys
        missing = [{"entity": {"key": key}, "version": 1} for key in keys]
        return datastore_pb2.LookupResponse.serialize({"missing": missing})

    handlers = {"Commit": commit, "Lookup": lookup}
    with _datastore_server(monkeypatch, handlers, database="named-db"):
        chunk = _chunk("p-route", 1, b"a")
        chunk.put()
        chunk.key.get()
        _ndb_rpc.commit(upserts=[chunk])
        _ndb_rpc.lookup([chunk.key])
    expected = "project_id=test-project&database_id=named-db"
    for method, calls in seen.items():
        assert len(calls) == 2, method
        ndb_own, ours = calls
        assert ndb_own["x-goog-request-params"] == expected
        assert ours["x-goog-request-params"] == expected, method


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 1_000_000])
def test_request_parts_are_the_request_fill_builds(ndb_stub, size):
    """The hand-written wire format of a chunk's upsert parses to exactly what _fill makes."""
    from google.cloud.datastore_v1.types import datastore as datastore_pb2

    data = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    record, chunks = _spilled("p-wire", data + b"tail")
    blobs = list(chunks.blobs())
    items = [*blobs, record, _chunk("p-wire", 9, b"whole entity")]
    deletes = [ndb.Key("Gone", 1), ndb.Key("Gone", "two")]
    parts = _ndb_rpc.request_parts(ndb_stub, items, deletes)
    # Each chunk's bytes are a part of their own: the view itself, never a copy.
    assert all(any(part is blob.data for part in parts) for blob in blobs)

    wire = datastore_pb2.CommitRequest.pb().FromString(b"".join(parts))
    expected = datastore_pb2.CommitRequest(
        project_id="test-project", mode=datastore_pb2.CommitRequest.Mode.NON_TRANSACTIONAL
    )._pb
    for item in (*items, *deletes):
        _ndb_rpc._fill(expected.mutations.add(), item)
    assert wire == expected


def test_commit_over_grpc_writes_what_ndb_put_writes(ndb_emulator):
    """On a gRPC client the request goes out as joined bytes; ndb reads back what it wrote."""
    data = bytes(range(256)) * 9_000
    record, chunks = _spilled("p-grpc", data)
    _ndb_rpc.commit(upserts=[record, *chunks.blobs()])
    assert record.key.get() == record
    assert ndb.get_multi([chunk.key for chunk in chunks]) == list(chunks)


def test_commit_over_grpc_retries_transient_errors_as_ndb_does(monkeypatch):
    """UNAVAILABLE twice, then OK: one write; a non-transient error is raised at once."""

    import grpc
    from google.api_core import exceptions as core_exceptions

    answers = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, None]
    calls: list[int] = []

    def commit(request: bytes, context) -> bytes:
        calls.append(len(request))
        status = answers.pop(0) if answers else grpc.StatusCode.INVALID_ARGUMENT
        if status is not None:
            context.abort(status, "try again" if answers else "bad request")
        return b""

    monkeypatch.setattr(_ndb_rpc, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    with _datastore_server(monkeypatch, {"Commit": commit}):
        _ndb_rpc.commit(upserts=[_chunk("p-retry", 1, b"a" * 1000)])
        assert len(calls) == 3 and len(set(calls)) == 1
        with pytest.raises(core_exceptions.InvalidArgument):
            _ndb_rpc.commit(upserts=[_chunk("p-retry", 1, b"a")])
        assert len(calls) == 4


class Counted(ndb.Model):
    group = ndb.StringProperty()


def test_count_is_one_aggregation_over_the_querys_kind_filters_ancestor_and_namespace(
    ndb_emulator,
):
    """On Google's legacy emulator (the datastore leg), which answers RunAggregationQuery with
    UNIMPLEMENTED, every count is None."""
    parent = ndb.Key("CountedParent", 1)
    ndb.put_multi(
        [Counted(group="a") for _ in range(7)]
        + [Counted(group="b") for _ in range(3)]
        + [Counted(parent=parent, group="a") for _ in range(2)]
    )
    with _datastore.in_namespace("tenant-x"):
        ndb.put_multi([Counted(group="a") for _ in range(5)])
    counts = [
        _ndb_rpc.count(Counted.query()),
        _ndb_rpc.count(Counted.query(Counted.group == "a")),
        _ndb_rpc.count(Counted.query(ancestor=parent)),
        _ndb_rpc.count(Counted.query(namespace="tenant-x")),
        _ndb_rpc.count(Counted.query(namespace="nobody")),
    ]
    with _datastore.in_namespace("tenant-x"):
        counts.append(_ndb_rpc.count(Counted.query()))  # the context's, as fetch() reads it
    if stack_support.DATASTORE == "datastore":
        assert counts == [None] * 6
    else:
        assert counts == [12, 9, 2, 5, 0, 5]


def test_count_is_none_where_the_client_cannot_count(ndb_stub):
    # inmemory-datastore-stub has no RunAggregationQuery at all.
    Counted(group="a").put()
    assert _ndb_rpc.count(Counted.query()) is None
