"""Request handling for each ``google.datastore.v1.Datastore`` RPC.

:class:`DatastoreService` keeps entities in :class:`._store.EntityStore` (sorted indexes per
(partition, kind), optimistic per-key concurrency, sqlite durability), serves queries from
those indexes (:mod:`._query`) and checks them against index.yaml (:mod:`._index_rules`).
Queries no single index serves are filtered here and handed to the stub's query engine
(:mod:`._stub_adapter`) to sort, page and project.

Every method takes the request message and returns the response message; failures raise
:class:`..errors.RpcError` (or the stub's ``LimitExceededError``) for the gRPC layer to turn
into a status code::

    service = DatastoreService(EntityStore(data_dir=None))
    response = service.Lookup(types.LookupRequest(project_id="p", keys=[...]))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import grpc
from google.cloud.datastore_v1 import types
from google.protobuf import timestamp_pb2

from ..errors import RpcError, invalid
from . import _index_rules, _limits, _query
from ._index import path_sort_key
from ._proto import pb
from ._store import (
    LOCK_TIMEOUT_SECONDS,
    NON_TRANSACTIONAL_LOCK_WAIT_SECONDS as NON_TRANSACTIONAL_LOCK_WAIT,
    EntityStore,
    Partition,
    StoredEntity,
    Transaction,
    Write,
    describe_key,
    key_bytes,
)
from ._stub_adapter import StubQueryEngine, check_entity, check_lookup_keys

#: The real service refuses a Commit request larger than this.
MAX_COMMIT_BYTES = 10 * 1024 * 1024
#: A query batch stops after this many results or bytes (then NOT_FINISHED), like Datastore's.
BATCH_MAX_RESULTS = 1000
BATCH_MAX_BYTES = 4 * 1024 * 1024
#: A Lookup response stops growing past this size; the remaining keys come back `deferred`.
LOOKUP_MAX_BYTES = 32 * 1024 * 1024

_Op = types.PropertyFilter.Operator
_MoreResults = types.QueryResultBatch.MoreResultsType
_KeyPb = types.Key.pb()
_EntityPb = types.Entity.pb()
_ValuePb = types.Value.pb()
_QueryPb = types.Query.pb()
_RunQueryResponsePb = types.RunQueryResponse.pb()
_KEY_COMPARISONS = {
    _Op.LESS_THAN: lambda a, b: a < b,
    _Op.LESS_THAN_OR_EQUAL: lambda a, b: a <= b,
    _Op.GREATER_THAN: lambda a, b: a > b,
    _Op.GREATER_THAN_OR_EQUAL: lambda a, b: a >= b,
    _Op.EQUAL: lambda a, b: a == b,
    _Op.NOT_EQUAL: lambda a, b: a != b,
}


class DatastoreService:
    """The emulator's RPC logic; callers serialize calls with ``state.lock``."""

    def __init__(
        self,
        state: EntityStore,
        indexes: list[_index_rules.CompositeIndex] | None = None,
        enforce_limits: bool = True,
    ) -> None:
        self.state = state
        #: index.yaml's indexes; None serves every query (no index.yaml given).
        self.indexes = indexes
        self.enforce_limits = enforce_limits
        self._engine = StubQueryEngine()
        #: False sends every query down the scan path (tests compare both paths).
        self.use_indexes = True
        #: Index entries (index path) or entities (scan path) queries have read so far.
        self.examined = 0

    # -- reads ---------------------------------------------------------------------------

    def Lookup(self, request: types.LookupRequest) -> types.LookupResponse:
        req = pb(request)
        if self.enforce_limits:
            check_lookup_keys(req.keys)
        if not req.keys:
            raise invalid("Lookup needs at least one key")
        transaction, new_transaction = self._read_transaction(req.read_options)
        response = types.LookupResponse.pb()(transaction=new_transaction, read_time=_now())
        found_bytes = 0
        for raw_key in req.keys:
            key = self._key(raw_key, req.project_id, req.database_id, allow_incomplete=False)
            if found_bytes > LOOKUP_MAX_BYTES:
                # Like Datastore, hand back the rest as `deferred`; clients look them up again.
                response.deferred.append(key)
                continue
            if transaction is not None:
                transaction.reads.setdefault(key_bytes(key), self.state.change_seq(key))
            stored = self.state.get(key)
            if stored is None:
                response.missing.add(entity=_EntityPb(key=key), version=self.state.seq)
            else:
                response.found.add(entity=pb(stored.entity), version=stored.version)
                found_bytes += pb(stored.entity).ByteSize()
        return response

    def RunQuery(self, request: types.RunQueryRequest) -> types.RunQueryResponse:
        req = pb(request)
        if req.HasField("gql_query"):
            raise invalid("GQL queries are not supported by this emulator; send a Query")
        transaction, new_transaction = self._read_transaction(req.read_options)
        partition = self._partition(req)
        response = self._execute(partition, req.query, transaction, batched=True)
        response.transaction = new_transaction
        return response

    def RunAggregationQuery(
        self, request: types.RunAggregationQueryRequest
    ) -> types.RunAggregationQueryResponse:
        req = pb(request)
        if req.HasField("gql_query"):
            raise invalid("GQL queries are not supported by this emulator; send a Query")
        aggregation = req.aggregation_query
        if not aggregation.aggregations:
            raise invalid("an aggregation query needs at least one aggregation")
        transaction, new_transaction = self._read_transaction(req.read_options)
        nested = _QueryPb()
        nested.CopyFrom(aggregation.nested_query)
        del nested.projection[:]
        batch = self._execute(self._partition(req), nested, transaction, batched=False).batch
        entities = [result.entity for result in batch.entity_results]

        response = types.RunAggregationQueryResponse.pb()(transaction=new_transaction)
        response.batch.more_results = _MoreResults.NO_MORE_RESULTS
        response.batch.read_time.CopyFrom(_now())
        result = response.batch.aggregation_results.add()
        for position, spec in enumerate(aggregation.aggregations, start=1):
            alias = spec.alias or f"property_{position}"
            if alias in result.aggregate_properties:
                raise invalid(f"aggregation alias {alias!r} is used twice")
            result.aggregate_properties[alias].CopyFrom(_aggregate(spec, entities))
        return response

    def _execute(
        self,
        partition: Partition,
        query: _QueryPb,
        transaction: Transaction | None,
        batched: bool,
    ) -> _RunQueryResponsePb:
        if len(query.kind) > 1:
            raise invalid("a query may name at most one kind")
        kind = query.kind[0].name if query.kind else None
        if kind is not None and not kind:
            raise invalid("the query's kind has an empty name")
        if transaction is not None:
            self._record_query(transaction, partition, kind)

        run = _QueryPb()
        run.CopyFrom(query)
        user_limit = query.limit.value if query.HasField("limit") else None
        if user_limit is not None and user_limit < 0:
            raise invalid("a query limit cannot be negative")
        if query.offset < 0:
            raise invalid("a query offset cannot be negative")
        capped = batched and (user_limit is None or user_limit > BATCH_MAX_RESULTS)
        if capped:
            run.limit.value = BATCH_MAX_RESULTS

        if self.indexes is not None:
            _index_rules.check(query, self.indexes)
        query_plan = _query.plan(query) if self.use_indexes else None
        if query_plan is not None:
            limit = run.limit.value if run.HasField("limit") else None
            response = self._execute_indexed(partition, query, query_plan, limit)
        else:
            response = self._execute_scan(partition, kind, query, run)
        batch = response.batch
        if capped and batch.more_results == _MoreResults.MORE_RESULTS_AFTER_LIMIT:
            batch.more_results = _MoreResults.NOT_FINISHED
        if batched:
            _cap_batch_bytes(batch)
        return response

    def _execute_indexed(
        self, partition: Partition, query: _QueryPb, query_plan: _query.Plan, limit: int | None
    ) -> _RunQueryResponsePb:
        """Serve ``query`` from one sorted index: the cost follows the page, not the kind."""
        response = _RunQueryResponsePb()
        batch = response.batch
        batch.snapshot_version = self.state.seq
        fields = [p.property.name for p in query.projection]
        if fields == ["__key__"]:
            batch.entity_result_type = types.EntityResult.ResultType.KEY_ONLY
        elif fields:
            batch.entity_result_type = types.EntityResult.ResultType.PROJECTION
        else:
            batch.entity_result_type = types.EntityResult.ResultType.FULL
        table = self.state.tables.get((*partition, query.kind[0].name))
        if table is None:
            batch.more_results = _MoreResults.NO_MORE_RESULTS
            batch.end_cursor = query.start_cursor
            return response

        key_filters = [types.PropertyFilter.wrap(f) for f in query_plan.key_filters]
        residual = (
            (lambda stored: all(self._matches_property_filter(stored, f) for f in key_filters))
            if key_filters
            else None
        )
        page = _query.run(table, query_plan, query, limit, residual)
        self.examined += page.examined
        for stored, cursor in page.results:
            entity = pb(stored.entity)
            result = batch.entity_results.add(version=stored.version, cursor=cursor)
            if not fields:
                result.entity.CopyFrom(entity)
                continue
            # Like the scan path: projected values come from the entity (see README).
            result.entity.key.CopyFrom(entity.key)
            for name in fields:
                if name in entity.properties:
                    result.entity.properties[name].CopyFrom(entity.properties[name])
        batch.skipped_results = page.skipped
        batch.more_results = (
            _MoreResults.MORE_RESULTS_AFTER_LIMIT if page.more else _MoreResults.NO_MORE_RESULTS
        )
        batch.end_cursor = page.end_cursor
        return response

    def _execute_scan(
        self, partition: Partition, kind: str | None, query: _QueryPb, run: _QueryPb
    ) -> _RunQueryResponsePb:
        """Filter every entity of the kind, then let the stub's engine sort and page them."""
        # Filtering here on the raw protobufs is ~50x faster than the stub's proto-plus
        # matcher; the stub's engine then orders, pages and projects the survivors only.
        matches = _compile_filter(query.filter, self)
        candidates = self.state.scan(partition, kind)
        self.examined += len(candidates)
        survivors = [s for s in candidates if matches(s)]
        try:
            return self._engine.run(run, survivors, self.state.seq)
        except TypeError as exc:
            raise invalid(f"cannot compare the values this query orders by: {exc}") from exc

    def _record_query(
        self, transaction: Transaction, partition: Partition, kind: str | None
    ) -> None:
        tables = (
            [(*partition, kind)]
            if kind is not None
            else [t for t in self.state.tables if t[:3] == partition]
        )
        for table in tables:
            transaction.queried.setdefault(table, self.state.table_seq(table))

    def _matches_property_filter(
        self, stored_obj: StoredEntity, prop_filter: types.PropertyFilter
    ) -> bool:
        # The stub only knows single-level ancestors and no __key__ comparisons.
        if prop_filter.property.name != "__key__":
            if prop_filter.op == _Op.HAS_ANCESTOR:
                raise invalid("HAS_ANCESTOR filters apply to __key__ only")
            return self._engine.matches_property_filter(stored_obj, prop_filter)

        entity_path = list(pb(stored_obj.entity).key.path)
        value = pb(prop_filter.value)
        if prop_filter.op in (_Op.IN, _Op.NOT_IN):
            if value.WhichOneof("value_type") != "array_value":
                raise invalid("IN / NOT_IN on __key__ needs an array of keys")
            keys = [_filter_key(v) for v in value.array_value.values]
            contained = any(list(k.path) == entity_path for k in keys)
            return contained if prop_filter.op == _Op.IN else not contained

        target = list(_filter_key(value).path)
        if prop_filter.op == _Op.HAS_ANCESTOR:
            return entity_path[: len(target)] == target
        compare = _KEY_COMPARISONS.get(prop_filter.op)
        if compare is None:
            raise invalid(f"unsupported operator on __key__: {prop_filter.op!r}")
        return compare(path_sort_key(entity_path), path_sort_key(target))

    # -- transactions --------------------------------------------------------------------

    def BeginTransaction(
        self, request: types.BeginTransactionRequest
    ) -> types.BeginTransactionResponse:
        req = pb(request)
        self._project(req)
        read_only = req.transaction_options.WhichOneof("mode") == "read_only"
        return types.BeginTransactionResponse.pb()(transaction=self.state.begin(read_only))

    def Rollback(self, request: types.RollbackRequest) -> types.RollbackResponse:
        req = pb(request)
        if not self.state.recently_ended(req.transaction):
            self._transaction(req.transaction)
            self.state.end(req.transaction)
        return types.RollbackResponse.pb()()

    def _read_transaction(self, read_options) -> tuple[Transaction | None, bytes]:
        """The transaction a read runs in, and the id of one it starts (else b"")."""
        which = read_options.WhichOneof("consistency_type")
        if which == "transaction":
            return self._transaction(read_options.transaction), b""
        if which == "new_transaction":
            read_only = read_options.new_transaction.WhichOneof("mode") == "read_only"
            transaction_id = self.state.begin(read_only)
            return self.state.transaction(transaction_id), transaction_id
        return None, b""

    def _transaction(self, transaction_id: bytes) -> Transaction:
        transaction = self.state.transaction(transaction_id) if transaction_id else None
        if transaction is None:
            raise invalid(
                "the transaction is unknown, or already committed, rolled back or expired"
            )
        return transaction

    # -- writes --------------------------------------------------------------------------

    def Commit(self, request: types.CommitRequest) -> types.CommitResponse:
        req = pb(request)
        size = req.ByteSize()
        if size > MAX_COMMIT_BYTES:
            raise invalid(
                f"commit request is {size} bytes, over the {MAX_COMMIT_BYTES} byte "
                "(10 MiB) limit of one Commit; split the writes over several commits"
            )
        self._project(req)
        selector = req.WhichOneof("transaction_selector")
        transactional = req.mode == types.CommitRequest.Mode.TRANSACTIONAL
        if selector == "transaction" and not transactional:
            raise invalid("a non-transactional commit cannot name a transaction")
        if transactional and selector is None:
            raise invalid("a transactional commit needs a transaction")
        transaction = self._transaction(req.transaction) if selector == "transaction" else None

        try:
            writes, results = self._wait_for_locks(req, transaction)
            if transaction is not None:
                if transaction.read_only and writes:
                    raise invalid("a read-only transaction cannot write")
                # Read-only transactions never abort in Datastore; only read-write ones do.
                conflicts = (
                    [] if transaction.read_only else self.state.conflicts(transaction, writes)
                )
                if conflicts:
                    raise RpcError(
                        grpc.StatusCode.ABORTED,
                        "too much contention on these datastore entities. please try again. "
                        f"changed since the transaction read them: {', '.join(conflicts[:10])}",
                    )
            version = self.state.apply(writes) if writes else self.state.seq
        finally:
            if transaction is not None:
                self.state.end(req.transaction)

        response = types.CommitResponse.pb()(index_updates=0, commit_time=_now())
        for result in results:
            if not result.conflict_detected:
                result.version = version
            response.mutation_results.append(result)
        return response

    def _wait_for_locks(self, req, transaction: Transaction | None) -> tuple[list[Write], list]:
        """The planned writes, once no other transaction holds a lock they need (pessimistic
        mode); planned again after each wait, since the state may have changed meanwhile."""
        wait = LOCK_TIMEOUT_SECONDS if transaction is not None else NON_TRANSACTIONAL_LOCK_WAIT
        deadline = time.monotonic() + wait
        while True:
            writes, results = self._plan_mutations(req)
            locked = self.state.lock_holders(transaction, writes)
            if not locked:
                return writes, results
            if not self.state.wait_for_release(deadline):
                raise RpcError(
                    grpc.StatusCode.ABORTED,
                    "Transaction lock timeout. Other transactions hold locks on: "
                    + ", ".join(locked[:10]),
                )

    def _plan_mutations(self, req) -> tuple[list[Write], list]:
        """Validate the mutations against the current state; return the writes to apply."""
        writes: list[Write] = []
        results = []
        # Whether each key exists after the mutations planned so far in this commit.
        exists_after: dict[bytes, bool] = {}
        transactional = req.mode == types.CommitRequest.Mode.TRANSACTIONAL
        seen: set[bytes] = set()
        for mutation in req.mutations:
            operation = mutation.WhichOneof("operation")
            if operation is None:
                raise invalid("a mutation needs one of insert, update, upsert or delete")
            result = types.MutationResult.pb()()
            if operation == "delete":
                key = self._key(mutation.delete, req.project_id, req.database_id, False)
                _limits.check_written_key(key)
                entity = None
            else:
                entity = _EntityPb()
                entity.CopyFrom(getattr(mutation, operation))
                may_allocate = operation in ("insert", "upsert")
                key = self._key(entity.key, req.project_id, req.database_id, may_allocate)
                if not _is_complete(key):
                    key.path[-1].id = self.state.allocate_ids(1, persist=False)[0]
                    result.key.CopyFrom(key)
                entity.key.CopyFrom(key)
                _limits.check_written_entity(entity, sizes=self.enforce_limits)
                if self.enforce_limits:
                    check_entity(types.Entity.wrap(entity))

            kb = key_bytes(key)
            if not transactional and kb in seen:
                raise invalid(
                    "A non-transactional commit may not contain multiple mutations affecting "
                    f"the same entity: {describe_key(key)}"
                )
            seen.add(kb)
            existing = self.state.get(key)
            exists = exists_after.get(kb, existing is not None)
            if operation == "insert" and exists:
                raise RpcError(
                    grpc.StatusCode.ALREADY_EXISTS, f"entity already exists: {describe_key(key)}"
                )
            if operation == "update" and not exists:
                raise RpcError(
                    grpc.StatusCode.NOT_FOUND, f"no entity to update: {describe_key(key)}"
                )
            if mutation.WhichOneof("conflict_detection_strategy") == "base_version":
                current = existing.version if existing is not None else 0
                if current != mutation.base_version:
                    result.conflict_detected = True
                    result.version = current
                    results.append(result)
                    continue
            exists_after[kb] = entity is not None
            writes.append(Write(key=key, kb=kb, entity=entity))
            results.append(result)
        return writes, results

    # -- ids -----------------------------------------------------------------------------

    def AllocateIds(self, request: types.AllocateIdsRequest) -> types.AllocateIdsResponse:
        req = pb(request)
        keys = [self._key(k, req.project_id, req.database_id, True) for k in req.keys]
        if any(_is_complete(key) for key in keys):
            raise invalid("AllocateIds takes incomplete keys only")
        for key, new_id in zip(keys, self.state.allocate_ids(len(keys), persist=True), strict=True):
            key.path[-1].id = new_id
        return types.AllocateIdsResponse.pb()(keys=keys)

    def ReserveIds(self, request: types.ReserveIdsRequest) -> types.ReserveIdsResponse:
        req = pb(request)
        keys = [self._key(k, req.project_id, req.database_id, False) for k in req.keys]
        self.state.reserve_ids(k.path[-1].id for k in keys if not k.path[-1].name)
        return types.ReserveIdsResponse.pb()()

    # -- validation ----------------------------------------------------------------------

    @staticmethod
    def _project(req) -> str:
        if not req.project_id:
            raise invalid("the request has no project_id")
        return req.project_id

    @classmethod
    def _partition(cls, req) -> Partition:
        cls._project(req)
        namespace = req.partition_id.namespace_id if req.HasField("partition_id") else ""
        if req.HasField("partition_id") and req.partition_id.project_id not in (
            "",
            req.project_id,
        ):
            raise invalid("partition_id.project_id does not match the request's project_id")
        _limits.check_partition(namespace)
        return (req.project_id, req.database_id, namespace)

    @staticmethod
    def _key(raw: _KeyPb, project: str, database: str, allow_incomplete: bool) -> _KeyPb:
        """A copy of ``raw`` with the request's project/database filled in, validated."""
        if not project:
            raise invalid("the request has no project_id")
        key = _KeyPb()
        key.CopyFrom(raw)
        partition = key.partition_id
        if not partition.project_id:
            partition.project_id = project
        elif partition.project_id != project:
            raise invalid(
                f"key project {partition.project_id!r} does not match request project {project!r}"
            )
        if not partition.database_id:
            partition.database_id = database
        if not key.path:
            raise invalid("a key needs at least one path element")
        if len(key.path) > 100:
            raise invalid("a key path may have at most 100 elements")
        for position, element in enumerate(key.path):
            if not element.kind:
                raise invalid(f"key path element {position} has no kind")
            id_type = element.WhichOneof("id_type")
            if id_type == "id" and element.id <= 0:
                raise invalid(f"key path element {position} has id {element.id}; ids are > 0")
            if id_type == "name" and not element.name:
                raise invalid(f"key path element {position} has an empty name")
            if id_type is None and (position < len(key.path) - 1 or not allow_incomplete):
                raise invalid(f"key path element {position} ({element.kind}) is incomplete")
        _limits.check_key_shape(key)
        return key


_Matcher = Callable[[StoredEntity], bool]
_SCALAR_COMPARISONS = {**_KEY_COMPARISONS}
# Values of these types compare with each other; any other pairing never matches, as in the
# stub (Python comparisons of unrelated types give NotImplemented there).
_SCALAR_FAMILY = {
    "integer_value": "number",
    "double_value": "number",
    "string_value": "string",
    "boolean_value": "boolean",
    "blob_value": "bytes",
    "timestamp_value": "timestamp",
}


def _scalar(value: _ValuePb) -> tuple[str, object] | None:
    """(family, comparable Python value) of a scalar Value, None for other types."""
    which = value.WhichOneof("value_type")
    family = _SCALAR_FAMILY.get(which)
    if family is None:
        return None
    if family == "timestamp":
        return family, (value.timestamp_value.seconds, value.timestamp_value.nanos)
    return family, getattr(value, which)


def _compile_filter(query_filter, service: DatastoreService) -> _Matcher:
    """A predicate over stored entities equivalent to the stub's matcher for ``query_filter``.

    Scalar property comparisons run on the raw protobufs; anything else (key-valued or
    embedded-entity properties, null filters, ...) falls back to the stub's own code.
    """
    which = query_filter.WhichOneof("filter_type")
    if which is None:
        return lambda stored: True
    if which == "composite_filter":
        composite = query_filter.composite_filter
        parts = [_compile_filter(sub, service) for sub in composite.filters]
        if composite.op == types.CompositeFilter.Operator.AND:
            return lambda stored: all(part(stored) for part in parts)
        if composite.op == types.CompositeFilter.Operator.OR:
            return lambda stored: any(part(stored) for part in parts)
        raise invalid("a composite filter needs the AND or OR operator")

    prop_filter = query_filter.property_filter
    wrapped = types.PropertyFilter.wrap(prop_filter)
    fallback: _Matcher = lambda stored: service._matches_property_filter(stored, wrapped)  # noqa: E731
    name, op = prop_filter.property.name, prop_filter.op
    if name == "__key__":
        return fallback
    if op in (_Op.IN, _Op.NOT_IN):
        if prop_filter.value.WhichOneof("value_type") != "array_value":
            return fallback
        candidates = [_scalar(v) for v in prop_filter.value.array_value.values]
        if None in candidates:
            return fallback
        wanted = set(candidates)

        def membership(stored: StoredEntity) -> bool:
            props = pb(stored.entity).properties
            if name not in props:
                return False
            contained = any(_scalar(v) in wanted for v in _values(props[name]))
            return contained if op == _Op.IN else not contained

        return membership

    compare = _SCALAR_COMPARISONS.get(op)
    target = _scalar(prop_filter.value)
    if compare is None or target is None:
        return fallback
    family, wanted_value = target

    def comparison(stored: StoredEntity) -> bool:
        props = pb(stored.entity).properties
        if name not in props:
            return False
        for value in _values(props[name]):
            scalar = _scalar(value)
            if scalar is not None and scalar[0] == family and compare(scalar[1], wanted_value):
                return True
        return False

    return comparison


def _values(value: _ValuePb) -> list[_ValuePb]:
    """The values a filter tests: the indexed elements of a list property, else the value.

    Values excluded from indexes never match a filter, as in Datastore (no index entry).
    """
    if value.exclude_from_indexes:
        return []
    if value.WhichOneof("value_type") == "array_value":
        return [v for v in value.array_value.values if not v.exclude_from_indexes]
    return [value]


def _cap_batch_bytes(batch) -> None:
    """Stop a batch once it holds BATCH_MAX_BYTES, so big entities page instead of failing."""
    total = 0
    for position, result in enumerate(batch.entity_results):
        total += result.ByteSize()
        if total > BATCH_MAX_BYTES and position > 0:
            del batch.entity_results[position:]
            batch.end_cursor = batch.entity_results[-1].cursor
            batch.more_results = _MoreResults.NOT_FINISHED
            return


def _filter_key(value: _ValuePb) -> _KeyPb:
    if value.WhichOneof("value_type") != "key_value":
        raise invalid("a __key__ filter needs a key value")
    return value.key_value


def _is_complete(key: _KeyPb) -> bool:
    return key.path[-1].WhichOneof("id_type") is not None


def _aggregate(spec, entities: list[_EntityPb]) -> _ValuePb:
    """The value of one COUNT / SUM / AVG aggregation over the matching entities."""
    operator = spec.WhichOneof("operator")
    if operator == "count":
        count = len(entities)
        if spec.count.HasField("up_to"):
            if spec.count.up_to.value <= 0:
                raise invalid("COUNT up_to must be positive")
            count = min(count, spec.count.up_to.value)
        return _ValuePb(integer_value=count)
    if operator not in ("sum", "avg"):
        raise invalid("aggregations are COUNT, SUM or AVG")
    name = getattr(spec, operator).property.name
    numbers: list[int | float] = []
    for entity in entities:
        if name in entity.properties:
            value = entity.properties[name]
            kind = value.WhichOneof("value_type")
            if kind == "integer_value":
                numbers.append(value.integer_value)
            elif kind == "double_value":
                numbers.append(value.double_value)
    if operator == "avg":
        if not numbers:
            return _ValuePb(null_value=0)
        return _ValuePb(double_value=math.fsum(numbers) / len(numbers))
    if all(isinstance(n, int) for n in numbers):
        total = sum(numbers)
        if -(2**63) <= total < 2**63:
            return _ValuePb(integer_value=total)
    return _ValuePb(double_value=math.fsum(numbers))


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
