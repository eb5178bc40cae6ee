"""Datastore writes without ndb's per-entity debug strings: the only module using ndb internals.

ndb formats ``repr(entity_pb)`` of every entity it puts into a ``Future``'s debug info
(``_datastore_api._NonTransactionalCommitBatch.put``, and the transactional batch likewise;
googleapis/python-ndb#1034). For a 1 MB payload chunk that is ~200 ms of CPU and a string
several times the chunk's size. gae_deferred's own kinds are written here instead, as one
Commit built directly and sent to whatever ndb client is configured (Datastore, the emulator,
or a test's in-memory stub), retried as ndb retries. On a gRPC client the request is sent as
bytes joined once from its parts, a chunk's bytes straight from their view, over the client's
own channel: no protobuf copy of a payload is held while it is sent. Transient errors are
retried on ndb's schedule; a request refused for its size or content is not (``is_transient``)::

    commit(upserts=[record, *chunks])                    # one non-transactional Commit
    commit(upserts=[Blob(key, Chunk, "data", view)])      # a chunk straight from a view
    commit(upserts=[marker], deletes=[record.key, ...])   # upserts and deletes together
    commit_mutations([upsert(chunk), delete(key)])        # sized first: Mutation.size
    join_transaction(upserts=[record, *chunks])           # part of the caller's commit
    lookup([record_key, *chunk_keys])                     # raw Entity pbs (or None), in order
    enter_context(context) ... exit_context()             # Context.use(), cheaper per task
    count(Item.query(Item.group == "a"))                  # one COUNT aggregation, or None

Entities are prepared and converted as ``Model.put()`` does (``_pre_put_hook``,
``_prepare_for_put``, ``_entity_to_protobuf``), so what is written is what ``put()`` would
write; post-put hooks do not run (gae_deferred's kinds define none). Only gae_deferred's
kinds go through here: they opt out of ndb's context and global caches, which these writes
do not update (nor these reads consult). Reads of big payloads come here too: ndb's get_multi
turns every chunk into a Model holding a copy of its bytes, and keeps its Lookup's response
alive in its batch futures; ``lookup`` returns the protobufs for the caller to copy and drop.
ndb has no aggregation queries: ``count`` sends the COUNT that iterate()'s progress needs.

Every internal used is listed in ``INTERNALS`` and checked when this module is imported: an
ndb release that drops one, or changes the parameters it takes, fails the import with
:class:`NdbInternalsChanged`, naming the internal, the installed version, the versions the
tests ran against (``SUPPORTED_NDB_VERSIONS``, pyproject.toml's range) and what to pin.
tests/test_ndb_rpc.py checks the rest (the commit batch's shape) against the pinned version.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from typing import Any, NamedTuple

import grpc
from google.api_core import exceptions as core_exceptions, gapic_v1
from google.cloud import ndb
from google.cloud.datastore_v1.types import (
    aggregation_result as aggregation_result_pb2,
    datastore as datastore_pb2,
    entity as entity_pb2,
    query as query_pb2,
)

from . import _outcome
from ._config import settings

#: The google-cloud-ndb version these internals were read from (requirements.txt pins it).
PINNED_NDB_VERSION = "2.7.1"
#: The ndb versions the tests ran against (pyproject.toml's range). Versions before 2.4.1
#: require protobuf < 7 and were not tested (the test environment resolves protobuf 7).
SUPPORTED_NDB_VERSIONS = ">=2.4.1,<=2.7.1"
#: Every ndb internal used below: (module, attribute path, the parameters it must take first;
#: None for an object that is not called with arguments of ours).
INTERNALS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("google.cloud.ndb._datastore_api", "make_call", ("rpc_name", "request")),
    ("google.cloud.ndb._datastore_api", "_get_commit_batch", ("transaction", "options")),
    ("google.cloud.ndb._datastore_api", "_TransactionalCommitBatch", ("transaction", "options")),
    ("google.cloud.ndb._datastore_api", "_TransactionalCommitBatch.commit", ("retries", "timeout")),
    ("google.cloud.ndb._options", "Options", None),
    ("google.cloud.ndb._retry", "is_transient_error", ("error",)),
    ("google.cloud.ndb.model", "_entity_to_protobuf", ("entity",)),
    ("google.cloud.ndb.model", "_entity_from_protobuf", ("protobuf",)),
    ("google.cloud.ndb.model", "Model._prepare_for_put", ()),
    ("google.cloud.ndb.tasklets", "Future", None),
    ("google.cloud.ndb.context", "_state._context", None),
    ("google.cloud.ndb.context", "_state._toplevel_context", None),
    ("google.cloud.ndb._datastore_query", "_query_to_protobuf", ("query",)),
    ("google.cloud.ndb.query", "QueryOptions", ("config", "context")),
)


class NdbInternalsChanged(ImportError):
    """The installed google-cloud-ndb lacks an internal this module uses, or changed what it
    takes: an ndb version outside ``SUPPORTED_NDB_VERSIONS``."""


def _changed(what: str) -> str:
    try:
        installed = metadata.version("google-cloud-ndb")
    except metadata.PackageNotFoundError:
        installed = "not installed"
    return (
        f"google-cloud-ndb internals changed: {what}. gae_deferred uses ndb internals and was "
        f"tested with google-cloud-ndb{SUPPORTED_NDB_VERSIONS} (installed: {installed}); pin "
        f"google-cloud-ndb=={PINNED_NDB_VERSION}, or re-read that ndb's _datastore_api and "
        "update gae_deferred/_ndb_rpc.py"
    )


def _check_internal(module_name: str, path: str, parameters: tuple[str, ...] | None) -> None:
    """Raise NdbInternalsChanged unless ``module_name``:``path`` exists and takes
    ``parameters`` first."""
    where = f"{module_name}.{path}"
    try:
        found: Any = importlib.import_module(module_name)
        for part in path.split("."):
            found = getattr(found, part)
        names = [] if parameters is None else list(inspect.signature(found).parameters)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise NdbInternalsChanged(_changed(f"{where} is missing ({exc})")) from exc
    names = [name for name in names if name != "self"]
    if parameters is not None and names[: len(parameters)] != list(parameters):
        raise NdbInternalsChanged(
            _changed(f"{where} takes ({', '.join(names)}), expected ({', '.join(parameters)}, ...)")
        )


for _internal in INTERNALS:
    _check_internal(*_internal)
del _internal

# Imported once checked: an ndb without them has failed above, with what to pin.
from google.cloud.ndb import (  # noqa: E402
    _datastore_api,
    _datastore_query,
    _options,
    _retry,
    context as context_module,
    model,
    query as query_module,
    tasklets,
)

logger = logging.getLogger("gae_deferred")
_NON_TRANSACTIONAL = datastore_pb2.CommitRequest.Mode.NON_TRANSACTIONAL
#: Waits before each retry of a transient error: ndb's own schedule (1 s, doubling, 3 retries).
RETRY_DELAYS = (1.0, 2.0, 4.0)


def _field_number(message: Any, name: str) -> int:
    return message.pb().DESCRIPTOR.fields_by_name[name].number


# Field numbers of the messages a chunk's upsert is written into by hand (see _blob_parts).
_COMMIT_MUTATIONS = _field_number(datastore_pb2.CommitRequest, "mutations")
_MUTATION_UPSERT = _field_number(datastore_pb2.Mutation, "upsert")
_ENTITY_KEY = _field_number(entity_pb2.Entity, "key")
_ENTITY_PROPERTIES = _field_number(entity_pb2.Entity, "properties")
_VALUE_BLOB = _field_number(entity_pb2.Value, "blob_value")
_MAP_KEY, _MAP_VALUE = 1, 2  # every protobuf map entry: key = 1, value = 2


class Blob(NamedTuple):
    """An entity of ``kind`` whose one bytes property ``prop`` is ``data``, written without a
    Model instance: its protobuf is the kind's, with ``data`` copied in straight from a view
    (a chunk of a spilled envelope is never held as bytes of its own)."""

    key: ndb.Key
    kind: type[ndb.Model]
    prop: str
    data: bytes | memoryview


@functools.lru_cache(maxsize=16)
def _blob_template(kind: type[ndb.Model], prop: str) -> Any:
    """What ``put()`` writes for a ``kind`` entity with only ``prop`` set, keyless."""
    entity = kind(**{prop: b"x"})
    entity._pre_put_hook()
    entity._prepare_for_put()
    return model._entity_to_protobuf(entity)._pb


def _fill(mutation: Any, item: ndb.Model | Blob | ndb.Key) -> None:
    """Make the Mutation protobuf ``mutation`` an upsert of ``item`` (a key: its delete)."""
    if isinstance(item, ndb.Key):
        mutation.delete.CopyFrom(item._key.to_protobuf()._pb)
    elif isinstance(item, Blob):
        upsert = mutation.upsert
        upsert.CopyFrom(_blob_template(item.kind, item.prop))
        upsert.key.CopyFrom(item.key._key.to_protobuf()._pb)
        data = item.data
        upsert.properties[item.prop].blob_value = data if type(data) is bytes else bytes(data)
    else:
        # What Model.put() does before converting: computed properties store their value
        # (_prepare_for_put) and the pre-put hook runs. Converted one at a time and copied into
        # the request, so a big payload's chunks are never all held twice.
        item._pre_put_hook()
        item._prepare_for_put()
        mutation.upsert.CopyFrom(model._entity_to_protobuf(item)._pb)


class Mutation(NamedTuple):
    """One mutation of a CommitRequest in wire format (``parts`` joined: the ``mutations`` field
    with its tag and length), its ``size`` in bytes, and the ``key`` it writes or deletes."""

    key: ndb.Key
    parts: list[bytes | memoryview]
    size: int
    delete: bool = False


def upsert(item: ndb.Model | Blob) -> Mutation:
    """The upsert of ``item`` as :func:`commit` sends it (a Blob's data is a part of its own,
    the view it came as; a Model is converted now, as ``put()`` converts it)."""
    if isinstance(item, Blob):
        parts = _delimited(_COMMIT_MUTATIONS, _blob_parts(item))
    else:
        mutation = datastore_pb2.Mutation()._pb
        _fill(mutation, item)
        parts = _delimited(_COMMIT_MUTATIONS, [mutation.SerializeToString()])
    return Mutation(item.key, parts, _size(parts))


def delete(key: ndb.Key) -> Mutation:
    """The delete of ``key`` as :func:`commit` sends it."""
    mutation = datastore_pb2.Mutation()._pb
    _fill(mutation, key)
    parts = _delimited(_COMMIT_MUTATIONS, [mutation.SerializeToString()])
    return Mutation(key, parts, _size(parts), delete=True)


def request_head(client: Any) -> bytes:
    """The serialized CommitRequest of ``client`` without mutations: what each Commit's bytes
    start with (``len(request_head(client)) + sum(m.size for m in mutations)`` is its size)."""
    return datastore_pb2.CommitRequest(
        project_id=client.project, database_id=client.database, mode=_NON_TRANSACTIONAL
    )._pb.SerializeToString()


def commit(upserts: Iterable[ndb.Model | Blob] = (), deletes: Iterable[ndb.Key] = ()) -> None:
    """One non-transactional Commit of these upserts and deletes, outside any transaction.

    On a gRPC client the request goes out as the bytes of :func:`request_parts` joined once: a
    chunk's bytes are copied into the request and into gRPC's buffer, and nowhere else (no
    protobuf holds them). Must run inside an ndb context; raises the Google API error of a failed
    Commit, after ndb's retries of transient errors (see :func:`is_transient`).
    """
    commit_mutations([*map(upsert, upserts), *map(delete, deletes)])


def commit_mutations(mutations: Sequence[Mutation]) -> None:
    """:func:`commit` of mutations made by :func:`upsert` and :func:`delete`."""
    client = ndb.get_context().client
    parts = _request_parts(client, mutations)
    channel = getattr(client.stub, "grpc_channel", None)
    if channel is None:
        # Not a gRPC client (inmemory-datastore-stub's): the same request, through ndb's call.
        request = datastore_pb2.CommitRequest.deserialize(b"".join(parts))
        _datastore_api.make_call(
            "commit", request, timeout=_timeout(), metadata=_routing(client)
        ).result()
        return
    body = b"".join(parts)
    del parts
    _send(_raw_commit(channel), body, _routing(client))


def request_parts(
    client: Any, upserts: Iterable[ndb.Model | Blob] = (), deletes: Iterable[ndb.Key] = ()
) -> list[bytes | memoryview]:
    """The serialized CommitRequest of :func:`commit`, as parts to join: a Blob's data is one
    part of its own, the view it came as."""
    return _request_parts(client, [*map(upsert, upserts), *map(delete, deletes)])


def _request_parts(client: Any, mutations: Sequence[Mutation]) -> list[bytes | memoryview]:
    parts: list[bytes | memoryview] = [request_head(client)]
    for mutation in mutations:
        parts += mutation.parts
    return parts


def _size(parts: list[bytes | memoryview]) -> int:
    return sum(len(part) if type(part) is bytes else part.nbytes for part in parts)


def _blob_parts(item: Blob) -> list[bytes | memoryview]:
    """The Mutation upserting ``item``, in wire format: what _fill makes, field for field
    (protobuf parses fields in any order; tests/test_ndb_rpc.py compares the two)."""
    rest, value_head = _blob_wire_template(item.kind, item.prop)
    value = [value_head, *_delimited(_VALUE_BLOB, [item.data])]
    entry = [*_delimited(_MAP_KEY, [item.prop.encode()]), *_delimited(_MAP_VALUE, value)]
    key = item.key._key.to_protobuf()._pb.SerializeToString()
    entity = [*_delimited(_ENTITY_KEY, [key]), rest, *_delimited(_ENTITY_PROPERTIES, entry)]
    return _delimited(_MUTATION_UPSERT, entity)


@functools.lru_cache(maxsize=16)
def _blob_wire_template(kind: type[ndb.Model], prop: str) -> tuple[bytes, bytes]:
    """The blob template's other fields serialized, and ``prop``'s Value without its bytes."""
    rest = type(_blob_template(kind, prop))()
    rest.CopyFrom(_blob_template(kind, prop))
    value = type(rest.properties[prop])()
    value.CopyFrom(rest.properties[prop])
    value.ClearField("blob_value")
    del rest.properties[prop]
    rest.ClearField("key")  # the template's incomplete key: each Blob brings its own
    return rest.SerializeToString(), value.SerializeToString()


def _delimited(number: int, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Field ``number`` holding the concatenated ``parts`` (length-delimited wire type)."""
    return [_varint(number << 3 | 2) + _varint(_size(parts)), *parts]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.lru_cache(maxsize=4)
def _raw_commit(channel: grpc.Channel) -> Any:
    """Commit on ``channel`` taking the request as bytes (the response stays unparsed)."""
    return channel.unary_unary("/google.datastore.v1.Datastore/Commit")


def _timeout() -> float:
    return settings().datastore_timeout_seconds


def _send(call: Any, body: bytes, metadata: tuple[tuple[str, str], ...]) -> None:
    """``call(body)``, retrying transient errors as ndb retries its own calls, all within one
    deadline (``datastore_timeout_seconds``): no retry starts that could not finish in it."""
    deadline = time.monotonic() + _timeout()
    for delay in (*RETRY_DELAYS, None):
        try:
            call(body, metadata=metadata, timeout=max(0.001, deadline - time.monotonic()))
            return
        except grpc.RpcError as error:
            exc = core_exceptions.from_grpc_error(error)
            late = delay is not None and time.monotonic() + delay >= deadline
            if delay is None or late or not is_transient(exc):
                raise exc from None
        time.sleep(delay)


#: How gRPC (client or server) words a message over its size limit: RESOURCE_EXHAUSTED, which
#: ndb retries as "too many requests", though the same request is refused every time.
_TOO_BIG = re.compile(r"message (exceeds maximum size|larger than max)", re.IGNORECASE)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed Datastore call may succeed if repeated: ndb's rule (UNAVAILABLE,
    INTERNAL, ABORTED, UNKNOWN, RESOURCE_EXHAUSTED), except a request refused for its size."""
    if isinstance(exc, core_exceptions.ResourceExhausted) and _TOO_BIG.search(str(exc)):
        return False
    return _retry.is_transient_error(exc)


#: Answers in which Datastore refused the request itself: sent again, it is refused again.
_REFUSALS = (
    core_exceptions.BadRequest,  # INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
    core_exceptions.Unauthorized,
    core_exceptions.Forbidden,
    core_exceptions.NotFound,
    core_exceptions.MethodNotImplemented,
)


def is_refusal(exc: BaseException) -> bool:
    """Whether Datastore refused the request (invalid, too big, not allowed), as opposed to
    not answering it or failing transiently through the retries (ndb's RetryError is judged
    by its last error)."""
    if isinstance(exc, core_exceptions.RetryError):
        exc = exc.cause if isinstance(exc.cause, BaseException) else exc
    if isinstance(exc, core_exceptions.ResourceExhausted):
        return bool(_TOO_BIG.search(str(exc)))
    return isinstance(exc, _REFUSALS)


def join_transaction(
    upserts: Iterable[ndb.Model | Blob] = (), deletes: Iterable[ndb.Key] = ()
) -> None:
    """Add these mutations to the current transaction's commit (sent when it commits).

    They are appended to ndb's commit batch of the transaction, each with a finished future as
    ndb's own transactional puts of complete keys have: the i-th future must stay the i-th
    mutation's, since ndb pairs them with the Commit's results.
    """
    context = ndb.get_context()
    if not context.in_transaction():
        raise RuntimeError("join_transaction needs an active ndb transaction")
    batch = _datastore_api._get_commit_batch(context.transaction, _options.Options())
    for item in (*upserts, *deletes):
        mutation = datastore_pb2.Mutation()
        _fill(mutation._pb, item)
        done = tasklets.Future()
        done.set_result(None)
        batch.mutations.append(mutation)
        batch.futures.append(done)


def count(query: ndb.Query) -> int | None:
    """How many entities ``query`` matches, from one COUNT aggregation (RunAggregationQuery:
    in production one entity read per 1,000 index entries, not one per entity). Must run inside
    an ndb context; the query's namespace is resolved as fetch() resolves it.

    None, logged, where the Datastore does not answer: Google's legacy emulator answers
    UNIMPLEMENTED, a count may need an index the app lacks or outlast the deadline. A count
    is an estimate for progress pages, so no answer is never an error. None too where the
    client has no such call at all (a test's in-memory stub)."""
    context = ndb.get_context()
    client = context.client
    if not hasattr(client.stub, "run_aggregation_query"):
        return None
    options = query_module.QueryOptions(
        context=context,
        kind=query.kind,
        ancestor=query.ancestor,
        filters=query.filters,
        namespace=query.namespace,
        project=query.project,
    )
    partition = entity_pb2.PartitionId(
        project_id=options.project,
        database_id=options.database,
        namespace_id=options.namespace,
    )
    aggregation = query_pb2.AggregationQuery(
        nested_query=_datastore_query._query_to_protobuf(options),
        aggregations=[query_pb2.AggregationQuery.Aggregation(alias="n", count={})],
    )
    request = datastore_pb2.RunAggregationQueryRequest(
        project_id=options.project,
        database_id=options.database,
        partition_id=partition,
        aggregation_query=aggregation,
    )
    try:
        response = _datastore_api.make_call(
            "run_aggregation_query", request, timeout=_timeout(), metadata=_routing(client)
        ).result()
    except core_exceptions.GoogleAPIError as exc:
        logger.info("Datastore did not count %s: %s", query, exc)
        return None
    result: aggregation_result_pb2.AggregationResult = response.batch.aggregation_results[0]
    value = result.aggregate_properties["n"]._pb
    # Google's Firestore emulator answers an empty count as a double (0.0).
    return int(getattr(value, value.WhichOneof("value_type")))


def lookup(
    keys: Sequence[ndb.Key], *, in_transaction: bool = True, retries: int | None = None
) -> list[Any]:
    """One Lookup of ``keys`` (repeated for any the service defers, as ndb does): each key's
    raw ``Entity`` protobuf, in order, or None where it does not exist.

    Reads in the current transaction when there is one (unless ``in_transaction`` is False), as
    ndb's own get does. Must run inside an ndb context; raises the Google API error of a failed
    Lookup (each attempt within ``datastore_timeout_seconds``; ``retries``: ndb's default).
    """
    return _lookup(keys, in_transaction, retries).result()


#: Retries of the Lookup that settles a commit whose answer was lost: one, so a blackholed
#: Datastore costs defer() about three deadlines in all (the commit's, two Lookups').
SETTLE_RETRIES = 1
#: The pause before that Lookup: a connection that was just reset often fails the next
#: request too, until gRPC notices it is gone.
SETTLE_PAUSE_SECONDS = 0.1


@tasklets.tasklet
def _lookup(keys: Sequence[ndb.Key], in_transaction: bool, retries: int | None = None) -> Any:
    context = ndb.get_context()
    client = context.client
    pending = [key._key.to_protobuf()._pb for key in keys]
    index = {key.SerializeToString(): number for number, key in enumerate(pending)}
    found: list[Any] = [None] * len(pending)
    while pending:
        request = datastore_pb2.LookupRequest(
            project_id=client.project, database_id=client.database
        )
        request._pb.keys.extend(pending)
        if in_transaction and context.in_transaction():
            request._pb.read_options.transaction = context.transaction
        response = yield _datastore_api.make_call(
            "lookup", request, retries=retries, timeout=_timeout(), metadata=_routing(client)
        )
        response = getattr(response, "_pb", response)
        for result in response.found:
            found[index[result.entity.key.SerializeToString()]] = result.entity
        pending = list(response.deferred)
    raise tasklets.Return(found)


def settle_transaction_commit(probe: ndb.Key, unknown: Callable[[Exception], Exception]) -> None:
    """Make the current transaction's Commit find out whether it landed when its answer is lost.

    ndb reruns a transaction whose Commit failed with a transient error, even when the Commit
    was applied and only its reply was lost: the caller's writes and a transactional defer then
    happen twice. Here a Commit that fails in a way that may have landed (see _outcome) reads
    ``probe``, a key the Commit writes, outside the transaction: there, the Commit landed and
    the transaction completes as committed (its on-commit callbacks run, nothing reruns); not
    there, ndb reruns it as before; the read fails too, ``unknown(error)`` is raised instead of
    the error (even when the rollback that follows fails as well), which ndb does not retry.
    Once per transaction, whoever calls it first.
    """
    context = ndb.get_context()
    batch = _datastore_api._get_commit_batch(context.transaction, _options.Options())
    if getattr(batch, "_gae_deferred_settled", False):
        return
    original = batch.commit

    @tasklets.tasklet
    def commit(retries: int | None = None, timeout: float | None = None) -> Any:
        try:
            yield original(retries=retries, timeout=timeout)
        except Exception as exc:
            if not _outcome.may_have_landed(exc):
                raise
            try:
                yield tasklets.sleep(SETTLE_PAUSE_SECONDS)
                found = yield _lookup([probe], False, SETTLE_RETRIES)
            except Exception as lookup_error:
                error = unknown(exc)
                error.__cause__ = lookup_error

                def outcome_unknown() -> None:
                    raise error

                # ndb rolls back next; if that fails too its error would be what the caller
                # sees. Callbacks on completion run last, whatever happened: this one wins.
                context.call_on_transaction_complete(outcome_unknown)
                raise error from lookup_error
            if found[0] is None:
                raise exc

    batch.commit = commit
    batch._gae_deferred_settled = True


def _routing(client: Any) -> tuple[tuple[str, str], ...]:
    """The ``x-goog-request-params`` header ndb sends with its own calls: Datastore routes a
    named database's requests by it."""
    params = {"project_id": client.project}
    if client.database:
        params["database_id"] = client.database
    return (gapic_v1.routing_header.to_grpc_metadata(params),)


def model_from_pb(entity_pb: Any) -> ndb.Model:
    """The Model of a raw ``Entity`` protobuf from :func:`lookup`, as ndb's get makes it."""
    return model._entity_from_protobuf(entity_pb)


#: ndb's current context without ``ndb.get_context()``'s property and checks: defer() reads it
#: on every call (the namespace a task runs in); None when there is none.
current_context = context_module._state._context.get


def enter_context(context: ndb.Context) -> None:
    """Make ``context`` the current and top-level one, as ``context.use()`` does when no
    context is active, without its generator-based context manager (every task enters one).
    Pair with :func:`exit_context`; only for a thread with no active context."""
    state = context_module._state
    state._context.set(context)
    state._toplevel_context.set(context)
    context.rpc_time = 0
    context.wait_time = 0


def exit_context() -> None:
    """Leave the context entered by :func:`enter_context` (none is current afterwards)."""
    state = context_module._state
    state._toplevel_context.set(None)
    state._context.set(None)
