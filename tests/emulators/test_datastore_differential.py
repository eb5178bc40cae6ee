"""Our Datastore emulator against Google's Firestore emulator in Datastore mode, call for call.

The same raw ``google.datastore.v1`` requests (the datastore_v1 gRPC client, no ndb in between)
go to both; each test compares what they answer: OK or the status code, and the results.
Where production's documented behaviour differs from Google's emulator, ours follows
production, and the test says so and pins both (emulators/datastore/README.md lists them).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.api_core import exceptions
from google.cloud.datastore_v1 import types
from google.cloud.datastore_v1.services.datastore import DatastoreClient
from google.cloud.datastore_v1.services.datastore.transports import DatastoreGrpcTransport

from gae_deferred.local.datastore import DatastoreEmulator

pytestmark = pytest.mark.e2e  # starts Google's emulator (Java)

_BIG = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
_Direction = types.PropertyOrder.Direction


class Raw:
    """Raw Datastore v1 calls on one emulator, in a project of the test's own."""

    def __init__(self, address: str, project: str) -> None:
        self.channel = grpc.insecure_channel(address, options=_BIG)
        self.client = DatastoreClient(transport=DatastoreGrpcTransport(channel=self.channel))
        self.project = project

    def key(self, kind: str, name: str, namespace: str = "") -> types.Key:
        partition = types.PartitionId(project_id=self.project, namespace_id=namespace)
        return types.Key(partition_id=partition, path=[types.Key.PathElement(kind=kind, name=name)])

    def commit(self, *mutations: types.Mutation, transaction: bytes = b"") -> None:
        mode = types.CommitRequest.Mode
        request = types.CommitRequest(
            project_id=self.project,
            mode=mode.TRANSACTIONAL if transaction else mode.NON_TRANSACTIONAL,
            mutations=list(mutations),
        )
        if transaction:
            request.transaction = transaction
        self.client.commit(request=request)

    def put(self, key: types.Key, transaction: bytes = b"", **properties: types.Value) -> None:
        entity = types.Entity(key=key, properties=properties)
        self.commit(types.Mutation(upsert=entity), transaction=transaction)

    def lookup(self, *keys: types.Key, transaction: bytes = b"") -> types.LookupResponse:
        options = types.ReadOptions(transaction=transaction) if transaction else None
        request = types.LookupRequest(project_id=self.project, keys=list(keys))
        if options is not None:
            request.read_options = options
        return self.client.lookup(request=request)

    def begin(self) -> bytes:
        request = types.BeginTransactionRequest(project_id=self.project)
        return self.client.begin_transaction(request=request).transaction

    def names(self, query: types.Query, namespace: str = "") -> list[str]:
        partition = types.PartitionId(project_id=self.project, namespace_id=namespace)
        request = types.RunQueryRequest(
            project_id=self.project, partition_id=partition, query=query
        )
        batch = self.client.run_query(request=request).batch
        return [result.entity.key.path[-1].name for result in batch.entity_results]


def outcome(call: Callable[[], object]) -> str:
    """ "OK", or the gRPC status code's name."""
    try:
        call()
    except exceptions.GoogleAPICallError as exc:
        return exc.grpc_status_code.name
    return "OK"


@pytest.fixture(scope="module")
def ours() -> Iterator[DatastoreEmulator]:
    with DatastoreEmulator(port=0) as emulator:
        yield emulator


@pytest.fixture
def both(request, ours, firestore_emulator) -> dict[str, Raw]:
    """A Raw client per emulator, both in one project named after the test (fresh data)."""
    project = "diff-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    return {"google": Raw(firestore_emulator.address, project), "ours": Raw(ours.address, project)}


def on_both(both: dict[str, Raw], case: Callable[[Raw], object]) -> dict[str, str]:
    return {name: outcome(lambda raw=raw: case(raw)) for name, raw in both.items()}


def _string(n: int) -> types.Value:
    return types.Value(string_value="s" * n)


def _blob(n: int, indexed: bool = True) -> types.Value:
    return types.Value(blob_value=b"b" * n, exclude_from_indexes=not indexed)


WRITES: dict[str, Callable[[Raw], object]] = {
    "reserved key name": lambda r: r.put(r.key("K", "__x__")),
    "reserved kind": lambda r: r.put(r.key("__x__", "a")),
    "reserved namespace": lambda r: r.put(r.key("K", "a", namespace="__x__")),
    "reserved property name": lambda r: r.put(r.key("K", "a"), __x__=_string(1)),
    "underscores that are not reserved": lambda r: r.put(r.key("K", "__x"), x__=_string(1)),
    "namespace of 100 characters": lambda r: r.put(r.key("K", "a", namespace="n" * 100)),
    "namespace of 101 characters": lambda r: r.put(r.key("K", "a", namespace="n" * 101)),
    "namespace with a space": lambda r: r.put(r.key("K", "a", namespace="a b")),
    "namespace of . - _": lambda r: r.put(r.key("K", "a", namespace="a.b-c_d")),
    "key name of 1,500 bytes": lambda r: r.put(r.key("K", "k" * 1500)),
    "key name of 1,501 bytes": lambda r: r.put(r.key("K", "k" * 1501)),
    "key name of 1,501 UTF-8 bytes": lambda r: r.put(r.key("K", "é" * 750 + "k")),
    "kind of 1,501 bytes": lambda r: r.put(r.key("k" * 1501, "a")),
    "property name of 1,501 bytes": lambda r: r.put(r.key("K", "a"), **{"p" * 1501: _string(1)}),
    "indexed string of 1,500 bytes": lambda r: r.put(r.key("K", "a"), s=_string(1500)),
    "indexed string of 1,501 bytes": lambda r: r.put(r.key("K", "a"), s=_string(1501)),
    "indexed blob of 1,500 bytes": lambda r: r.put(r.key("K", "a"), b=_blob(1500)),
    "indexed blob of 1,501 bytes": lambda r: r.put(r.key("K", "a"), b=_blob(1501)),
    "indexed blob of 1,501 bytes in an array": lambda r: r.put(
        r.key("K", "a"), a=types.Value(array_value=types.ArrayValue(values=[_blob(1501)]))
    ),
    "unindexed blob of 1,048,487 bytes": lambda r: r.put(
        r.key("B", "x"), b=_blob(1_048_487, False)
    ),
    "unindexed blob of 1,048,488 bytes": lambda r: r.put(
        r.key("B", "x"), b=_blob(1_048_488, False)
    ),
    "same key twice in one non-transactional commit": lambda r: r.commit(
        types.Mutation(upsert=types.Entity(key=r.key("K", "d"))),
        types.Mutation(upsert=types.Entity(key=r.key("K", "d"))),
    ),
    "upsert and delete of one key in one non-transactional commit": lambda r: r.commit(
        types.Mutation(upsert=types.Entity(key=r.key("K", "d"))),
        types.Mutation(delete=r.key("K", "d")),
    ),
    "same key twice in one transactional commit": lambda r: r.commit(
        types.Mutation(upsert=types.Entity(key=r.key("K", "d"))),
        types.Mutation(upsert=types.Entity(key=r.key("K", "d"))),
        transaction=r.begin(),
    ),
    "delete of a reserved kind": lambda r: r.commit(types.Mutation(delete=r.key("__x__", "a"))),
}

READS: dict[str, Callable[[Raw], object]] = {
    "lookup of a reserved kind, name and namespace": lambda r: r.lookup(
        r.key("__x__", "a"), r.key("K", "__x__"), r.key("K", "a", namespace="__x__")
    ),
    "lookup of a key name of 1,501 bytes": lambda r: r.lookup(r.key("K", "k" * 1501)),
    "lookup in a namespace of 101 characters": lambda r: r.lookup(r.key("K", "a", "n" * 101)),
    "query in a namespace of 101 characters": lambda r: r.names(
        types.Query(kind=[types.KindExpression(name="K")]), namespace="n" * 101
    ),
    "query of a reserved namespace": lambda r: r.names(
        types.Query(kind=[types.KindExpression(name="K")]), namespace="__x__"
    ),
}


@pytest.mark.parametrize("case", list(WRITES))
def test_writes_are_accepted_and_refused_alike(both, case):
    answers = on_both(both, WRITES[case])
    assert answers["ours"] == answers["google"], answers


@pytest.mark.parametrize("case", list(READS))
def test_reads_are_accepted_and_refused_alike(both, case):
    answers = on_both(both, READS[case])
    assert answers["ours"] == answers["google"], answers


def test_a_lookup_of_1001_keys_is_refused_as_in_production(both):
    """Production allows 1,000 keys per Lookup (https://cloud.google.com/datastore/docs/
    concepts/limits); Google's emulator does not check it. Ours follows production."""
    answers = on_both(both, lambda r: r.lookup(*[r.key("K", f"k{i}") for i in range(1001)]))
    assert answers == {"google": "OK", "ours": "INVALID_ARGUMENT"}
    answers = on_both(both, lambda r: r.lookup(*[r.key("K", f"k{i}") for i in range(1000)]))
    assert answers == {"google": "OK", "ours": "OK"}


DOUBLES = {"nan": math.nan, "-inf": -math.inf, "-1": -1.0, "0": 0.0, "2.5": 2.5, "inf": math.inf}


def _doubles(raw: Raw) -> None:
    for name, number in DOUBLES.items():
        raw.put(raw.key("N", name), v=types.Value(double_value=number))


def _by_v(direction, value_filter: types.Filter | None = None) -> types.Query:
    query = types.Query(
        kind=[types.KindExpression(name="N")],
        order=[
            types.PropertyOrder(property=types.PropertyReference(name="v"), direction=direction)
        ],
    )
    if value_filter is not None:
        query.filter = value_filter
    return query


def _v(op, number: float) -> types.Filter:
    return types.Filter(
        property_filter=types.PropertyFilter(
            property=types.PropertyReference(name="v"),
            op=op,
            value=types.Value(double_value=number),
        )
    )


def test_nan_orders_after_every_other_double(both):
    for raw in both.values():
        _doubles(raw)
    op = types.PropertyFilter.Operator
    queries = {
        "ascending": _by_v(_Direction.ASCENDING),
        "descending": _by_v(_Direction.DESCENDING),
        "over -inf": _by_v(_Direction.ASCENDING, _v(op.GREATER_THAN, -math.inf)),
        "equal to NaN": _by_v(_Direction.ASCENDING, _v(op.EQUAL, math.nan)),
    }
    for what, query in queries.items():
        answers = {name: raw.names(query) for name, raw in both.items()}
        assert answers["ours"] == answers["google"], (what, answers)
    assert answers["google"] == ["nan"]


# -- transactions --------------------------------------------------------------------------


def _n(raw: Raw, name: str = "t") -> int:
    [found] = raw.lookup(raw.key("T", name)).found
    return found.entity.properties["n"].integer_value


def _set(raw: Raw, n: int, transaction: bytes = b"", name: str = "t") -> None:
    raw.put(raw.key("T", name), transaction=transaction, n=types.Value(integer_value=n))


def test_blind_writes_of_two_transactions_both_commit(both):
    """Neither transaction read the entity: no lock is taken before the commit, so both commit
    and the last one wins."""
    for name, raw in both.items():
        _set(raw, 0)
        first, second = raw.begin(), raw.begin()
        assert outcome(lambda raw=raw, first=first: _set(raw, 1, first)) == "OK", name
        assert outcome(lambda raw=raw, second=second: _set(raw, 2, second)) == "OK", name
        assert _n(raw) == 2, name


def test_a_write_waits_for_the_transaction_that_read_the_entity(both):
    """Pessimistic concurrency (Firestore in Datastore mode's default): a non-transactional
    write to an entity an open transaction has read waits until that transaction commits,
    and the transaction commits."""
    for name, raw in both.items():
        _set(raw, 0)
        transaction = raw.begin()
        raw.lookup(raw.key("T", "t"), transaction=transaction)
        done: dict[str, object] = {}

        def write(raw=raw, done=done):
            done["answer"] = outcome(lambda: _set(raw, 2))
            done["at"] = time.monotonic()

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(0.5)
        assert writer.is_alive(), f"{name}: the write did not wait for the transaction"
        committed_at = time.monotonic()
        assert outcome(lambda raw=raw, t=transaction: _set(raw, 1, t)) == "OK", name
        writer.join(10)
        assert done["answer"] == "OK" and done["at"] >= committed_at, (name, done)
        assert _n(raw) == 2, name


def test_two_transactions_that_read_then_write_one_entity_one_aborts(both):
    """Both hold a read lock the other's commit waits for: after the lock timeout one commit
    is ABORTED, which releases its lock, and the other commits."""
    for name, raw in both.items():
        _set(raw, 0)
        first, second = raw.begin(), raw.begin()
        for transaction in (first, second):
            raw.lookup(raw.key("T", "t"), transaction=transaction)
        answers: dict[str, str] = {}

        def commit(label, transaction, n, raw=raw, answers=answers):
            answers[label] = outcome(lambda: _set(raw, n, transaction))

        threads = [
            threading.Thread(target=commit, args=("first", first, 1)),
            threading.Thread(target=commit, args=("second", second, 2)),
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        for thread in threads:
            thread.join(30)
        took = time.monotonic() - started
        assert sorted(answers.values()) == ["ABORTED", "OK"], (name, answers)
        winner = 1 if answers["first"] == "OK" else 2
        assert _n(raw) == winner, name
        assert 1.0 < took < 10, (name, took)
