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

import emulators.datastore._service
from emulators.datastore import DatastoreEmulator, IndexYamlError

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "emu-test"


class DsEmuThing(ndb.Model):
    n = ndb.IntegerProperty()
    tag = ndb.StringProperty()
    blob = ndb.BlobProperty()


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
        with pytest.raises(exceptions.InvalidArgument, match="byte limit"):
            DsEmuThing(blob=b"x" * (1024 * 1024 + 10)).put()
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


def test_conflicting_transactions_abort(raw_client):
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


def test_ndb_retries_a_transaction_that_hit_a_conflict(client, raw_client):
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
    monkeypatch.setattr(emulators.datastore._service, "LOOKUP_MAX_BYTES", 2_500)
    with client.context():
        keys = ndb.put_multi([DsEmuThing(n=i, blob=b"z" * 1_000) for i in range(6)])
        emulator.reset_counts()
        assert [e.n for e in ndb.get_multi(keys, use_cache=False)] == list(range(6))
    assert emulator.rpc_counts["Lookup"] > 1


def test_long_queries_come_back_in_batches(emulator, client, monkeypatch):
    monkeypatch.setattr(emulators.datastore._service, "BATCH_MAX_RESULTS", 5)
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
        [sys.executable, "-m", "emulators.datastore", "--port", "0", "--data-dir", str(data_dir)],
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
            [sys.executable, "-m", "emulators.datastore", "--port", str(port)],
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
        [sys.executable, "-m", "emulators.datastore", "--index-yaml", str(tmp_path / "nope.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "index.yaml not found" in result.stderr
    assert time.monotonic() - started < 30
