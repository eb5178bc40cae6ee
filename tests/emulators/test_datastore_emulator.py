"""The Datastore emulator, driven through the real ndb and google-cloud-datastore clients."""

from __future__ import annotations

import datetime
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import datastore, ndb
from google.cloud.datastore_v1 import types
from hypothesis import HealthCheck, example, given, settings, strategies as st

import gae_deferred.local.datastore._service
from gae_deferred.local.datastore import DatastoreEmulator
from gae_deferred.local.errors import IndexYamlError

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "emu-test"


class DsEmuThing(ndb.Model):
    n = ndb.IntegerProperty()
    tag = ndb.StringProperty()
    blob = ndb.BlobProperty()


class DsEmuTwoBlobs(ndb.Model):
    a = ndb.BlobProperty()
    b = ndb.BlobProperty()


def _client(emulator: DatastoreEmulator, monkeypatch: pytest.MonkeyPatch, **kwargs) -> ndb.Client:
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", emulator.address)
    return ndb.Client(project=PROJECT, credentials=AnonymousCredentials(), **kwargs)


@pytest.fixture
def emulator(tmp_path):
    emu = DatastoreEmulator(host="127.0.0.1", port=0, data_dir=tmp_path / "datastore")
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def client(emulator, monkeypatch):
    return _client(emulator, monkeypatch)


@pytest.fixture
def raw_client(emulator, monkeypatch):
    """The google-cloud-datastore client, whose transactions do not retry on ABORTED."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", emulator.address)
    return datastore.Client(project=PROJECT)


@pytest.fixture
def optimistic(monkeypatch):
    """An emulator in optimistic concurrency mode; yields (ndb client, raw client)."""
    with DatastoreEmulator(port=0, concurrency="optimistic") as emu:
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", emu.address)
        yield _client(emu, monkeypatch), datastore.Client(project=PROJECT)


def _raw_call(emulator: DatastoreEmulator, method: str, payload: bytes) -> bytes:
    """Call one Datastore method with hand-made request bytes."""
    with grpc.insecure_channel(emulator.address) as channel:
        call = channel.unary_unary(f"/google.datastore.v1.Datastore/{method}")
        return call(payload, timeout=5)


def _grpc_code(emulator: DatastoreEmulator, method: str, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        _raw_call(emulator, method, type(request).serialize(request))
    return caught.value.code(), caught.value.details()


def _seed(count: int = 12) -> list[ndb.Key]:
    return ndb.put_multi([DsEmuThing(n=i, tag="odd" if i % 2 else "even") for i in range(count)])


# -- entities ---------------------------------------------------------------------------


def test_put_get_delete_multi(client):
    with client.context():
        keys = ndb.put_multi([DsEmuThing(n=i) for i in range(5)] + [DsEmuThing(id="named", n=9)])
        assert len(set(keys)) == 6 and keys[-1].id() == "named"
        assert [e.n for e in ndb.get_multi(keys, use_cache=False)] == [0, 1, 2, 3, 4, 9]

        ndb.delete_multi(keys[:2])
        fetched = ndb.get_multi(keys, use_cache=False)
        assert fetched[:2] == [None, None]
        assert [e.n for e in fetched[2:]] == [2, 3, 4, 9]


def test_namespaces_and_projects_are_separate(emulator, monkeypatch):
    first = _client(emulator, monkeypatch, namespace="a")
    second = _client(emulator, monkeypatch, namespace="b")
    with first.context():
        DsEmuThing(id="k", n=1).put()
    with second.context():
        assert DsEmuThing.get_by_id("k", use_cache=False) is None
        assert DsEmuThing.query().count() == 0
    with first.context():
        assert DsEmuThing.get_by_id("k", use_cache=False).n == 1


# -- queries ----------------------------------------------------------------------------


def test_query_filters_and_orders(client):
    with client.context():
        _seed()
        odd_desc = DsEmuThing.query(DsEmuThing.tag == "odd").order(-DsEmuThing.n).fetch()
        assert [e.n for e in odd_desc] == [11, 9, 7, 5, 3, 1]
        window = DsEmuThing.query(DsEmuThing.n >= 3, DsEmuThing.n < 6).order(DsEmuThing.n)
        assert [e.n for e in window] == [3, 4, 5]
        assert sorted(e.n for e in DsEmuThing.query(DsEmuThing.n.IN([2, 7, 40]))) == [2, 7]
        assert DsEmuThing.query(DsEmuThing.tag == "none").fetch() == []


def test_filters_on_dates_booleans_and_list_properties(client):
    class DsEmuEvent(ndb.Model):
        when = ndb.DateTimeProperty()
        done = ndb.BooleanProperty()
        labels = ndb.StringProperty(repeated=True)

    start = datetime.datetime(2024, 1, 1)
    with client.context():
        ndb.put_multi(
            [
                DsEmuEvent(
                    id=i,
                    when=start + datetime.timedelta(days=i),
                    done=i % 2 == 0,
                    labels=["all", f"n{i}"],
                )
                for i in range(1, 6)
            ]
        )
        later = DsEmuEvent.query(DsEmuEvent.when > start + datetime.timedelta(days=3))
        assert sorted(e.key.id() for e in later) == [4, 5]
        assert sorted(e.key.id() for e in DsEmuEvent.query(DsEmuEvent.done == True)) == [2, 4]  # noqa: E712
        assert DsEmuEvent.query(DsEmuEvent.labels == "all").count() == 5
        assert [e.key.id() for e in DsEmuEvent.query(DsEmuEvent.labels == "n3")] == [3]


def test_fetch_page_walks_every_result_once(client):
    with client.context():
        _seed(25)
        query = DsEmuThing.query().order(DsEmuThing.n)
        seen, cursor, more = [], None, True
        while more:
            page, cursor, more = query.fetch_page(10, start_cursor=cursor)
            seen.append([e.n for e in page])
        assert seen == [list(range(10)), list(range(10, 20)), list(range(20, 25))]


def test_projection_keys_only_and_count(client):
    with client.context():
        keys = _seed()
        projected = DsEmuThing.query(DsEmuThing.tag == "even").fetch(projection=[DsEmuThing.n])
        assert sorted(e.n for e in projected) == [0, 2, 4, 6, 8, 10]
        with pytest.raises(ndb.UnprojectedPropertyError):
            _ = projected[0].tag
        assert set(DsEmuThing.query().fetch(keys_only=True)) == set(keys)
        assert DsEmuThing.query().count() == 12
        assert DsEmuThing.query(DsEmuThing.tag == "odd").count() == 6


def test_ancestor_queries_include_deep_descendants(client):
    with client.context():
        root = DsEmuThing(id="root", n=0).put()
        child = DsEmuThing(parent=root, id="child", n=1).put()
        DsEmuThing(parent=child, id="grandchild", n=2).put()
        DsEmuThing(id="other", n=3).put()
        assert sorted(e.n for e in DsEmuThing.query(ancestor=root)) == [0, 1, 2]
        assert sorted(e.n for e in DsEmuThing.query(ancestor=child)) == [1, 2]


def test_aggregation_count_sum_avg(client, raw_client):
    with client.context():
        _seed(5)
    query = raw_client.query(kind="DsEmuThing")
    aggregation = raw_client.aggregation_query(query).count(alias="total")
    aggregation.sum("n", alias="total_n").avg("n", alias="mean_n")
    results = {r.alias: r.value for batch in aggregation.fetch() for r in batch}
    assert results == {"total": 5, "total_n": 10, "mean_n": 2.0}


def test_queries_only_scan_their_own_kind(emulator, client):
    class DsEmuOther(ndb.Model):
        n = ndb.IntegerProperty()

    with client.context():
        _seed(3)
        DsEmuOther(n=1).put()
    state = emulator._state
    assert len(state.scan((PROJECT, "", ""), "DsEmuOther")) == 1
    assert len(state.scan((PROJECT, "", ""), "DsEmuThing")) == 3


def test_missing_composite_index_fails_until_declared(tmp_path, monkeypatch):
    index_yaml = tmp_path / "index.yaml"
    index_yaml.write_text("indexes:\n- kind: DsEmuThing\n  properties:\n  - name: blob\n")
    query_args = ((DsEmuThing.tag == "odd",), (-DsEmuThing.n,))

    with (
        DatastoreEmulator(port=0, index_yaml=index_yaml) as emu,
        _client(emu, monkeypatch).context(),
    ):
        _seed(4)
        with pytest.raises(exceptions.FailedPrecondition) as caught:
            DsEmuThing.query(*query_args[0]).order(*query_args[1]).fetch()
        message = str(caught.value)
        assert "no matching index found" in message
        assert "- kind: DsEmuThing" in message and "direction: desc" in message

    index_yaml.write_text(
        "indexes:\n- kind: DsEmuThing\n  properties:\n  - name: tag\n"
        "  - name: n\n    direction: desc\n"
    )
    with (
        DatastoreEmulator(port=0, index_yaml=index_yaml) as emu,
        _client(emu, monkeypatch).context(),
    ):
        _seed(4)
        found = DsEmuThing.query(*query_args[0]).order(*query_args[1]).fetch()
        assert [e.n for e in found] == [3, 1]


def test_invalid_index_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(IndexYamlError, match="not found"):
        DatastoreEmulator(index_yaml=tmp_path / "missing.yaml")
    bad = tmp_path / "index.yaml"
    bad.write_text("indexes:\n- kind: X\n  properties:\n  - name: a\n    direction: sideways\n")
    with pytest.raises(IndexYamlError, match="asc or desc"):
        DatastoreEmulator(index_yaml=bad)


# -- limits -----------------------------------------------------------------------------


def test_entity_over_one_mib_is_rejected(client):
    with client.context():
        with pytest.raises(exceptions.InvalidArgument, match="longer than 1048487 bytes"):
            DsEmuThing(blob=b"x" * (1024 * 1024 + 10)).put()
        with pytest.raises(exceptions.InvalidArgument, match="byte limit"):
            DsEmuTwoBlobs(a=b"x" * 600_000, b=b"y" * 600_000).put()
        DsEmuThing(id="fits", blob=b"x" * 1_000_000).put()
        assert len(DsEmuThing.get_by_id("fits", use_cache=False).blob) == 1_000_000


def test_commit_over_ten_mib_is_rejected(client):
    with client.context():
        big = [DsEmuThing(id=f"big{i}", blob=b"y" * 1_000_000) for i in range(11)]
        with pytest.raises(exceptions.InvalidArgument, match="10 MiB"):

            @ndb.transactional(retries=0)
            def write_all():
                ndb.put_multi(big)

            write_all()
        assert DsEmuThing.get_by_id("big0", use_cache=False) is None


# -- transactions -----------------------------------------------------------------------


def test_transaction_commits_and_rolls_back(client):
    with client.context():
        key = DsEmuThing(id="acct", n=10).put()

        @ndb.transactional()
        def add(amount):
            entity = key.get()
            entity.n += amount
            entity.put()

        add(5)
        assert key.get(use_cache=False).n == 15

        @ndb.transactional()
        def add_then_fail():
            add(100)
            raise RuntimeError("changed my mind")

        with pytest.raises(RuntimeError):
            add_then_fail()
        assert key.get(use_cache=False).n == 15


def test_optimistic_conflicting_transactions_abort(optimistic):
    _, raw_client = optimistic
    key = raw_client.key("DsEmuThing", "contended")
    entity = datastore.Entity(key)
    entity["n"] = 0
    raw_client.put(entity)

    slow = raw_client.transaction()
    slow.begin()
    seen = raw_client.get(key, transaction=slow)

    with raw_client.transaction():
        fast = raw_client.get(key)
        fast["n"] = 1
        raw_client.put(fast)

    seen["n"] = 2
    slow.put(seen)
    with pytest.raises(exceptions.Aborted, match="contention"):
        slow.commit()
    assert raw_client.get(key)["n"] == 1


def test_optimistic_ndb_retries_a_transaction_that_hit_a_conflict(optimistic):
    client, raw_client = optimistic
    with client.context():
        key = DsEmuThing(id="retried", n=0).put()
        attempts = []

        @ndb.transactional(retries=3)
        def increment():
            entity = key.get()
            attempts.append(entity.n)
            if len(attempts) == 1:
                # Another writer commits between this transaction's read and its commit.
                other = raw_client.get(raw_client.key("DsEmuThing", "retried"))
                other["n"] = 10
                raw_client.put(other)
            entity.n += 1
            entity.put()

        increment()
        assert attempts == [0, 10]
        assert key.get(use_cache=False).n == 11


def test_pessimistic_ndb_retries_a_transaction_that_hit_a_lock_timeout(client):
    """Two ndb transactions read then write one entity at once: each holds a read lock the
    other's commit waits for, one commit times out (ABORTED), ndb retries it, both count."""
    with client.context():
        key = DsEmuThing(id="locked", n=0).put()
    both_read = threading.Barrier(2)
    attempts = []

    def increment():
        with client.context():

            @ndb.transactional(retries=3)
            def once():
                entity = key.get(use_cache=False)
                attempts.append(entity.n)
                if len(attempts) <= 2:
                    both_read.wait(10)
                entity.n += 1
                entity.put()

            once()

    threads = [threading.Thread(target=increment) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with client.context():
        assert key.get(use_cache=False).n == 2
    assert sorted(attempts) == [0, 0, 1]


def test_pessimistic_transaction_fails_with_lock_timeout_not_contention(raw_client):
    """A transaction whose commit waits on another's read lock is ABORTED after about 2 s;
    the one holding the lock commits."""
    key = raw_client.key("DsEmuThing", "contended")
    entity = datastore.Entity(key)
    entity["n"] = 0
    raw_client.put(entity)
    holder = raw_client.transaction()
    holder.begin()
    seen = raw_client.get(key, transaction=holder)
    started = time.monotonic()
    with (
        pytest.raises(exceptions.Aborted, match="Transaction lock timeout"),
        raw_client.transaction(),
    ):
        other = raw_client.get(key)
        other["n"] = 1
        raw_client.put(other)
    assert 1.9 < time.monotonic() - started < 10
    seen["n"] = 2
    holder.put(seen)
    holder.commit()
    assert raw_client.get(key)["n"] == 2


def test_pessimistic_locks_of_a_vanished_transaction_expire_with_it(raw_client, monkeypatch):
    """A client that read in a transaction and vanished holds its locks until the transaction
    expires (60 s idle in Datastore); then the waiting write goes through."""
    from gae_deferred.local.datastore import _store

    monkeypatch.setattr(_store, "TRANSACTION_IDLE_SECONDS", 1.0)
    key = raw_client.key("DsEmuThing", "orphan")
    entity = datastore.Entity(key)
    entity["n"] = 0
    raw_client.put(entity)
    vanished = raw_client.transaction()
    vanished.begin()
    raw_client.get(key, transaction=vanished)
    started = time.monotonic()
    entity["n"] = 1
    raw_client.put(entity)
    assert 0.9 < time.monotonic() - started < 10
    assert raw_client.get(key)["n"] == 1


def test_insert_existing_and_update_missing_keys(emulator):
    key = types.Key(partition_id=types.PartitionId(project_id=PROJECT))
    key.path.append(types.Key.PathElement(kind="DsEmuThing", name="k"))
    entity = types.Entity(key=key)

    def commit(**mutation):
        return types.CommitRequest(
            project_id=PROJECT,
            mode=types.CommitRequest.Mode.NON_TRANSACTIONAL,
            mutations=[types.Mutation(**mutation)],
        )

    assert _grpc_code(emulator, "Commit", commit(update=entity))[0] == grpc.StatusCode.NOT_FOUND
    _raw_call(emulator, "Commit", types.CommitRequest.serialize(commit(insert=entity)))
    code, details = _grpc_code(emulator, "Commit", commit(insert=entity))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "DsEmuThing:k" in details

    unknown = types.CommitRequest(
        project_id=PROJECT,
        mode=types.CommitRequest.Mode.TRANSACTIONAL,
        transaction=b"no-such-transaction",
        mutations=[types.Mutation(upsert=entity)],
    )
    assert _grpc_code(emulator, "Commit", unknown)[0] == grpc.StatusCode.INVALID_ARGUMENT


# -- robustness -------------------------------------------------------------------------


def test_garbage_requests_are_invalid_argument_and_the_server_survives(emulator, client):
    for method in ("Lookup", "Commit", "RunQuery", "AllocateIds"):
        with pytest.raises(grpc.RpcError) as caught:
            _raw_call(emulator, method, b"\xff\xff\xff\xff\x0f garbage")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    no_kind = types.LookupRequest(project_id=PROJECT, keys=[types.Key(path=[{"id": 4}])])
    code, details = _grpc_code(emulator, "Lookup", no_kind)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no kind" in details
    no_project = types.RunQueryRequest(query=types.Query(kind=[{"name": "DsEmuThing"}]))
    assert _grpc_code(emulator, "RunQuery", no_project)[0] == grpc.StatusCode.INVALID_ARGUMENT

    with client.context():
        assert DsEmuThing(n=1).put().get(use_cache=False).n == 1


def test_big_lookups_come_back_in_parts_through_deferred(emulator, client, monkeypatch):
    monkeypatch.setattr(gae_deferred.local.datastore._service, "LOOKUP_MAX_BYTES", 2_500)
    with client.context():
        keys = ndb.put_multi([DsEmuThing(n=i, blob=b"z" * 1_000) for i in range(6)])
        emulator.reset_counts()
        assert [e.n for e in ndb.get_multi(keys, use_cache=False)] == list(range(6))
    assert emulator.rpc_counts["Lookup"] > 1


def test_long_queries_come_back_in_batches(emulator, client, monkeypatch):
    monkeypatch.setattr(gae_deferred.local.datastore._service, "BATCH_MAX_RESULTS", 5)
    with client.context():
        _seed(12)
        emulator.reset_counts()
        assert [e.n for e in DsEmuThing.query().order(DsEmuThing.n)] == list(range(12))
        assert [e.n for e in DsEmuThing.query().order(DsEmuThing.n).fetch(7)] == list(range(7))
    assert emulator.rpc_counts["RunQuery"] >= 4


def test_rpc_counts(emulator, client):
    with client.context():
        key = DsEmuThing(n=1).put()
        emulator.reset_counts()
        key.get(use_cache=False)
        key.get(use_cache=False)
        DsEmuThing(n=2).put()
    assert emulator.rpc_counts == {"Lookup": 2, "Commit": 1}


def test_concurrent_writers_lose_nothing(client):
    def write(worker):
        with client.context():
            ndb.put_multi([DsEmuThing(id=f"w{worker}-{i}", n=i) for i in range(20)])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with client.context():
        assert DsEmuThing.query().count() == 80


# -- durability -------------------------------------------------------------------------


def test_stop_and_start_keeps_entities_and_never_reuses_ids(tmp_path, monkeypatch):
    data_dir = tmp_path / "datastore"
    with DatastoreEmulator(port=0, data_dir=data_dir) as emu, _client(emu, monkeypatch).context():
        keys = _seed(5)
        allocated = DsEmuThing.allocate_ids(3)
        ndb.delete_multi(keys[:1])

    with DatastoreEmulator(port=0, data_dir=data_dir) as emu, _client(emu, monkeypatch).context():
        assert sorted(e.n for e in DsEmuThing.query()) == [1, 2, 3, 4]
        fresh = {k.id() for k in DsEmuThing.allocate_ids(3)} | {DsEmuThing(n=9).put().id()}
        assert not fresh & {k.id() for k in list(keys) + list(allocated)}


def _start_cli(data_dir: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gae_deferred.local.datastore",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], 20)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("datastore emulator listening on "):
        process.kill()
        raise AssertionError(f"emulator did not start: {line!r} {process.stderr.read()}")
    return process, line.rsplit(" ", 1)[1].strip()


def test_cli_survives_kill_9(tmp_path, monkeypatch):
    data_dir = tmp_path / "datastore"
    process, address = _start_cli(data_dir)
    try:
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", address)
        with ndb.Client(project=PROJECT, credentials=AnonymousCredentials()).context():
            keys = _seed(6)
            allocated = DsEmuThing.allocate_ids(5)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    process, address = _start_cli(data_dir)
    try:
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", address)
        with ndb.Client(project=PROJECT, credentials=AnonymousCredentials()).context():
            assert [e.n for e in ndb.get_multi(keys, use_cache=False)] == list(range(6))
            again = DsEmuThing.allocate_ids(5)
            assert min(k.id() for k in again) > max(k.id() for k in list(keys) + list(allocated))
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_cli_port_in_use_exits_2(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gae_deferred.local.datastore", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert str(port) in result.stderr and "in use" in result.stderr


def test_cli_bad_index_yaml_exits_2(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gae_deferred.local.datastore",
            "--index-yaml",
            str(tmp_path / "nope.yaml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "index.yaml not found" in result.stderr
    assert time.monotonic() - started < 30


# -- indexes ----------------------------------------------------------------------------

_EntityPb = types.Entity.pb()
_ValuePb = types.Value.pb()
_Op = types.PropertyFilter.Operator
_PROPS = ("a", "b", "c")
# A small universe so that equal values, ties and several types per property are common.
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([-2.5, 0.5, 2.0]),
    st.sampled_from(["", "a", "b"]),
    st.sampled_from([b"", b"a"]),
)
_PROPERTY = st.tuples(
    st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3)),  # a value or a list of values
    st.sampled_from([False, False, False, True]),  # excluded from indexes
)
_ENTITIES = st.lists(
    st.dictionaries(st.sampled_from(_PROPS), _PROPERTY, max_size=3), min_size=1, max_size=25
)


def _value_pb(value: object, excluded: bool = False) -> _ValuePb:
    if isinstance(value, list):
        return _ValuePb(array_value={"values": [_value_pb(v, excluded) for v in value]})
    result = _ValuePb(exclude_from_indexes=excluded)
    if value is None:
        result.null_value = 0
    elif isinstance(value, bool):
        result.boolean_value = value
    elif isinstance(value, int):
        result.integer_value = value
    elif isinstance(value, float):
        result.double_value = value
    elif isinstance(value, str):
        result.string_value = value
    else:
        result.blob_value = value
    return result


def _rank(value: object) -> tuple:
    """Datastore's cross-type order, written independently of the emulator's encoding."""
    if value is None:
        return (0,)
    if isinstance(value, bool):
        return (3, value)
    if isinstance(value, int | float):
        return (1, value)
    return (4, value) if isinstance(value, str) else (5, value)


def _reference(entities: list[dict], equal: dict, ranged, orders: list) -> list[int]:
    """Brute force: the ids a Datastore index scan returns for this query, in order."""
    found = []
    for entity_id, props in enumerate(entities, start=1):
        indexed = {}
        for name, (value, excluded) in props.items():
            values = value if isinstance(value, list) else [value]
            indexed[name] = [] if excluded else sorted({_rank(v) for v in values})
        if any(_rank(v) not in indexed.get(name, []) for name, v in equal.items()):
            continue
        allowed = dict(indexed)
        if ranged is not None:
            name, bounds = ranged
            allowed[name] = [
                v
                for v in indexed.get(name, [])
                if all(v[0] == _rank(b)[0] and _RANGE_TESTS[op](v, _rank(b)) for op, b in bounds)
            ]
        columns = [allowed.get(name, []) for name, _ in orders]
        if any(not column for column in columns):
            continue
        # The entity sorts by its first index entry: smallest value per ascending column,
        # largest per descending one, then by key.
        first = tuple(
            (min(column) if not desc else _Reversed(max(column)))
            for column, (_, desc) in zip(columns, orders, strict=True)
        )
        found.append(((*first, entity_id), entity_id))
    return [entity_id for _, entity_id in sorted(found)]


_RANGE_TESTS = {
    _Op.LESS_THAN: lambda v, b: v < b,
    _Op.LESS_THAN_OR_EQUAL: lambda v, b: v <= b,
    _Op.GREATER_THAN: lambda v, b: v > b,
    _Op.GREATER_THAN_OR_EQUAL: lambda v, b: v >= b,
}


class _Reversed:
    def __init__(self, value: tuple) -> None:
        self.value = value

    def __lt__(self, other: _Reversed) -> bool:
        return other.value < self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and self.value == other.value


@st.composite
def _queries(draw):
    equal = draw(st.dictionaries(st.sampled_from(_PROPS), _SCALARS, max_size=2))
    free = [p for p in _PROPS if p not in equal]
    ranged = None
    if free and draw(st.booleans()):
        name = draw(st.sampled_from(free))
        bounds = draw(
            st.lists(
                st.tuples(st.sampled_from(list(_RANGE_TESTS)), _SCALARS), min_size=1, max_size=2
            )
        )
        ranged = (name, bounds)
    order_names = draw(st.lists(st.sampled_from(free), unique=True, max_size=2)) if free else []
    if ranged is not None:
        order_names = [ranged[0], *[n for n in order_names if n != ranged[0]]]
    orders = [(name, draw(st.booleans())) for name in order_names]
    return equal, ranged, orders


def _query_pb(equal: dict, ranged, orders: list, **extra) -> types.Query:
    filters = [
        types.Filter(
            property_filter={"property": {"name": n}, "op": _Op.EQUAL, "value": _value_pb(v)}
        )
        for n, v in equal.items()
    ]
    if ranged is not None:
        filters += [
            types.Filter(
                property_filter={"property": {"name": ranged[0]}, "op": op, "value": _value_pb(b)}
            )
            for op, b in ranged[1]
        ]
    query = types.Query(kind=[{"name": "K"}], **extra)
    if filters:
        query.filter = types.Filter(composite_filter={"op": "AND", "filters": filters})
    query.order = [
        types.PropertyOrder(property={"name": n}, direction=2 if desc else 1) for n, desc in orders
    ]
    return query


def _service_with(entities: list[dict]):
    from gae_deferred.local.datastore._service import DatastoreService
    from gae_deferred.local.datastore._store import EntityStore

    service = DatastoreService(EntityStore(data_dir=None))
    mutations = []
    for entity_id, props in enumerate(entities, start=1):
        entity = _EntityPb(
            key={"partition_id": {"project_id": PROJECT}, "path": [{"kind": "K", "id": entity_id}]}
        )
        for name, (value, excluded) in props.items():
            entity.properties[name].CopyFrom(_value_pb(value, excluded))
        mutations.append(types.Mutation(upsert=types.Entity.wrap(entity)))
    service.Commit(types.CommitRequest(project_id=PROJECT, mode=2, mutations=mutations))
    return service


def _ids(service, query: types.Query) -> tuple[list[int], bytes, int]:
    response = service.RunQuery(types.RunQueryRequest(project_id=PROJECT, query=query))
    batch = response.batch  # the service answers with raw protobufs
    ids = [r.entity.key.path[-1].id for r in batch.entity_results]
    return ids, batch.end_cursor, batch.more_results


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entities=_ENTITIES, query=_queries(), page=st.integers(1, 4))
# A list property puts an entity before and after a cursor: the next page must not repeat it.
@example(
    entities=[{"a": ([1, 3], False)}, {"a": (2, False)}], query=({}, None, [("a", False)]), page=1
)
def test_index_results_match_a_brute_force_reference(entities, query, page):
    equal, ranged, orders = query
    effective = list(orders) or ([(ranged[0], False)] if ranged else [])
    expected = _reference(entities, equal, ranged, effective)
    service = _service_with(entities)

    found, _, _ = _ids(service, _query_pb(equal, ranged, orders))
    assert found == expected

    # The same results page by page through cursors, and with an offset.
    paged, cursor, more = [], b"", True
    while more:
        ids, cursor, state = _ids(
            service, _query_pb(equal, ranged, orders, limit=page, start_cursor=cursor)
        )
        paged += ids
        more = state == types.QueryResultBatch.MoreResultsType.MORE_RESULTS_AFTER_LIMIT
        assert len(paged) <= len(expected)
    assert paged == expected
    assert _ids(service, _query_pb(equal, ranged, orders, offset=page))[0] == expected[page:]


def test_mixed_types_sort_in_datastore_order(raw_client):
    values = ["b", 2, None, True, 1.5, b"x", datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)]
    for position, value in enumerate(values):
        entity = datastore.Entity(raw_client.key("DsEmuMixed", position + 1))
        entity["v"] = value
        raw_client.put(entity)
    ordered = [e["v"] for e in raw_client.query(kind="DsEmuMixed", order=["v"]).fetch()]
    assert ordered[:3] == [None, 1.5, 2]
    assert isinstance(ordered[3], datetime.datetime)
    assert ordered[4:] == [True, "b", b"x"]
    descending = [e.key.id for e in raw_client.query(kind="DsEmuMixed", order=["-v"]).fetch()]
    assert descending == [6, 1, 4, 7, 2, 5, 3]


def test_unindexed_and_missing_properties_are_not_in_indexes(raw_client):
    for name, note in (("x", "hidden"), ("y", "shown")):
        entity = datastore.Entity(
            raw_client.key("DsEmuNote", name), exclude_from_indexes=["note"] if name == "x" else ()
        )
        entity["note"] = note
        raw_client.put(entity)
    raw_client.put(datastore.Entity(raw_client.key("DsEmuNote", "z")))
    query = raw_client.query(kind="DsEmuNote")
    query.add_filter(filter=datastore.query.PropertyFilter("note", "=", "hidden"))
    assert list(query.fetch()) == []
    ordered = raw_client.query(kind="DsEmuNote", order=["note"]).fetch()
    assert [e.key.name for e in ordered] == ["y"]
    assert len(list(raw_client.query(kind="DsEmuNote").fetch())) == 3


def test_paging_with_cursors_is_stable_under_writes(client):
    with client.context():
        keys = ndb.put_multi([DsEmuThing(id=f"p{i:02d}", n=i * 10) for i in range(30)])
        query = DsEmuThing.query().order(DsEmuThing.n)
        seen = []
        page, cursor, more = query.fetch_page(10, start_cursor=None)
        seen += [e.n for e in page]
        step = 0
        while more:
            step += 1
            # Writes before the cursor (inserts and deletes of returned records) must not
            # shift the next page; an update moving a record behind the cursor hides it.
            DsEmuThing(id=f"early{step}", n=-step).put()
            keys[step].delete()
            DsEmuThing(id="p29", n=-100).put()
            page, cursor, more = query.fetch_page(10, start_cursor=cursor)
            seen += [e.n for e in page]
        assert seen == [n * 10 for n in range(29)]


def test_a_page_reads_index_entries_not_the_whole_kind(emulator, client):
    from gae_deferred.local.datastore._store import Write, key_bytes

    state = emulator._state
    writes = []
    for number in range(10_000):
        entity = _EntityPb(
            key={
                "partition_id": {"project_id": PROJECT},
                "path": [{"kind": "DsEmuThing", "id": number + 1}],
            }
        )
        entity.properties["n"].integer_value = number
        entity.properties["tag"].string_value = ("even", "odd")[number % 2]
        writes.append(Write(key=entity.key, kb=key_bytes(entity.key), entity=entity))
    with state.lock:
        state.apply(writes)

    with client.context():
        query = DsEmuThing.query(DsEmuThing.tag == "even").order(-DsEmuThing.n)
        query.fetch_page(50)  # builds the (tag, -n) index once
        emulator.reset_counts()
        first, cursor, more = query.fetch_page(50)
        assert [e.n for e in first] == list(range(9998, 9898, -2)) and more
        assert emulator.entities_examined <= 60
        emulator.reset_counts()
        second, _, _ = query.fetch_page(50, start_cursor=cursor)
        assert [e.n for e in second] == list(range(9898, 9798, -2))
        assert emulator.entities_examined <= 60
        emulator.reset_counts()
        window = DsEmuThing.query(DsEmuThing.n >= 5000).order(DsEmuThing.n).fetch(50)
        assert [e.n for e in window] == list(range(5000, 5050))
        assert emulator.entities_examined <= 60

        # A shape no single index serves (two inequality properties) scans the kind.
        emulator.reset_counts()
        both = DsEmuThing.query(DsEmuThing.n > 9990, DsEmuThing.tag > "even").fetch()
        assert sorted(e.n for e in both) == [9991, 9993, 9995, 9997, 9999]
        assert emulator.entities_examined >= 10_000


def test_index_yaml_with_an_empty_indexes_key_declares_nothing(tmp_path):
    from gae_deferred.local.datastore.server import load_index_yaml

    empty = tmp_path / "index.yaml"
    empty.write_text("indexes:\n# none yet\n")
    assert load_index_yaml(empty) == []
