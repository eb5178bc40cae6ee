"""Index-served queries: seek to the first matching index entry, read until the page is full.

:func:`plan` decides whether a query can be served by one sorted index (the shape
Datastore itself serves from a built-in or composite index): equality filters on any
properties, range filters on at most one property that is also the first sort order, sort
orders, and ``__key__`` / ancestor filters (checked on each candidate). Anything else
(OR, IN, !=, NOT_IN, kindless queries, several inequality properties...) returns None and
the service falls back to scanning the kind. :func:`run` executes a plan::

    query_plan = plan(query_pb)
    if query_plan is not None:
        page = run(table, query_plan, query_pb, limit=50, residual=matcher)
        page.results, page.more, page.examined

Its cost is the entries read: the page, what ``offset`` skips, and entries the ``__key__``
filters reject — not the size of the kind.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from google.cloud.datastore_v1 import types

from ..errors import invalid
from ._index import (
    TOP,
    Desc,
    IndexSpec,
    SortedIndex,
    column,
    decode_cursor,
    encode,
    encode_cursor,
    entries_for,
)
from ._store import KindTable, StoredEntity

_Op = types.PropertyFilter.Operator
_Direction = types.PropertyOrder.Direction
_RANGE_OPS = (
    _Op.LESS_THAN,
    _Op.LESS_THAN_OR_EQUAL,
    _Op.GREATER_THAN,
    _Op.GREATER_THAN_OR_EQUAL,
)


@dataclass
class Plan:
    """How one query reads one index.

    ``equal`` maps each equality-filtered property to its encoded value; ``orders`` are
    the sort columns after them (the range property first, when there is one). The range
    is ``lower``/``upper`` bounds as (encoded value, inclusive), None when unbounded.
    """

    equal: dict[str, tuple]
    orders: list[tuple[str, bool]]
    lower: tuple[tuple, bool] | None = None
    upper: tuple[tuple, bool] | None = None
    #: Filters on __key__ (incl. ancestor): checked per candidate entity.
    key_filters: list = field(default_factory=list)
    #: The range filters contradict each other (e.g. different value types): no results.
    empty: bool = False

    def spec(self) -> IndexSpec:
        """The exact index shape this plan reads: equality columns by name, then the orders."""
        return tuple((name, False) for name in sorted(self.equal)) + tuple(self.orders)


def plan(query) -> Plan | None:
    """The index plan for a ``Query`` protobuf, or None when no single index serves it."""
    if len(query.kind) != 1 or query.distinct_on:
        return None
    filters = _conjuncts(query.filter)
    if filters is None:
        return None
    equal: dict[str, tuple] = {}
    ranges: dict[str, list[tuple[int, tuple]]] = {}
    key_filters = []
    for prop_filter in filters:
        name = prop_filter.property.name
        if name == "__key__":
            key_filters.append(prop_filter)
            continue
        value = encode(prop_filter.value)
        if value is None or not name:
            return None
        if prop_filter.op == _Op.EQUAL:
            if name in equal:
                return None
            equal[name] = value
        elif prop_filter.op in _RANGE_OPS:
            ranges.setdefault(name, []).append((prop_filter.op, value))
        else:
            return None
    if len(ranges) > 1 or set(ranges) & set(equal):
        return None

    orders: list[tuple[str, bool]] = []
    for position, order in enumerate(query.order):
        name = order.property.name
        descending = order.direction == _Direction.DESCENDING
        if order.direction not in (_Direction.ASCENDING, _Direction.DESCENDING):
            return None
        if name == "__key__":
            # Ascending key order is every index's last column; anything else is not served.
            if descending or position != len(query.order) - 1:
                return None
            continue
        if name in equal:
            # Sorting on a property fixed by an equality filter changes nothing.
            continue
        if any(name == seen for seen, _ in orders):
            return None
        orders.append((name, descending))

    result = Plan(equal=equal, orders=orders, key_filters=key_filters)
    if ranges:
        name, bounds = next(iter(ranges.items()))
        if orders and orders[0][0] != name:
            # Datastore requires the inequality property to be sorted on first.
            return None
        if not orders:
            orders.append((name, False))
        _set_bounds(result, bounds)
    return result


def _conjuncts(query_filter) -> list | None:
    """The property filters of a filter that is one property filter or nested ANDs of them."""
    which = query_filter.WhichOneof("filter_type")
    if which is None:
        return []
    if which == "property_filter":
        return [query_filter.property_filter]
    composite = query_filter.composite_filter
    if composite.op != types.CompositeFilter.Operator.AND:
        return None
    found = []
    for sub in composite.filters:
        parts = _conjuncts(sub)
        if parts is None:
            return None
        found += parts
    return found


def _set_bounds(result: Plan, bounds: list[tuple[int, tuple]]) -> None:
    # A range filter only matches values of its own type (numbers count as one type).
    ranks = {value[0] for _, value in bounds}
    if len(ranks) > 1:
        result.empty = True
        return
    (rank,) = ranks
    lower: tuple[tuple, bool] = ((rank,), True)
    upper: tuple[tuple, bool] = ((rank, TOP), True)
    for op, value in bounds:
        if op in (_Op.GREATER_THAN, _Op.GREATER_THAN_OR_EQUAL):
            inclusive = op == _Op.GREATER_THAN_OR_EQUAL
            if value > lower[0] or (value == lower[0] and not inclusive):
                lower = (value, inclusive)
        else:
            inclusive = op == _Op.LESS_THAN_OR_EQUAL
            if value < upper[0] or (value == upper[0] and not inclusive):
                upper = (value, inclusive)
    result.lower, result.upper = lower, upper


@dataclass
class Page:
    """What :func:`run` read: results (entity, cursor after it), skips, whether more exist."""

    results: list[tuple[StoredEntity, bytes]]
    skipped: int
    more: bool
    end_cursor: bytes
    examined: int


def choose_index(table: KindTable, query_plan: Plan) -> tuple[SortedIndex, int]:
    """An existing index serving the plan (equality columns in any order), else a new one.

    Returns the index and how many leading columns the equality filters fix.
    """
    fixed = len(query_plan.equal)
    wanted = tuple(query_plan.orders)
    for spec, index in table.indexes.items():
        names = {name for name, _ in spec[:fixed]}
        if names == set(query_plan.equal) and spec[fixed:] == wanted:
            return index, fixed
    return table.index(query_plan.spec()), fixed


def run(
    table: KindTable,
    query_plan: Plan,
    query,
    limit: int | None,
    residual: Callable[[StoredEntity], bool] | None,
) -> Page:
    """Read one page of ``query`` from the index that serves ``query_plan``."""
    index, fixed = choose_index(table, query_plan)
    spec, entries = index.spec, index.entries
    prefix = tuple(column(query_plan.equal[name], desc) for name, desc in spec[:fixed])
    start_cursor = bytes(query.start_cursor)
    if query_plan.empty:
        return Page([], 0, False, start_cursor, 0)

    start, end = _range(entries, prefix, spec, fixed, query_plan)
    range_start = start
    if start_cursor:
        start = max(start, _after(entries, decode_cursor(start_cursor, spec)))
    if query.end_cursor:
        end = min(end, _after(entries, decode_cursor(bytes(query.end_cursor), spec)))

    offset = query.offset
    results: list[tuple[StoredEntity, bytes]] = []
    seen: set[bytes] = set()
    skipped = examined = 0
    more = False
    end_cursor = start_cursor
    for position in range(start, end):
        entry = entries[position]
        examined += 1
        kb = entry[-1]
        if kb in seen:
            continue
        seen.add(kb)
        stored = table.entities[kb]
        if residual is not None and not residual(stored):
            continue
        if start > range_start and _listed_before(stored, kb, spec, entries, range_start, start):
            # A list property gave this entity an earlier entry: it was already returned.
            continue
        if limit is not None and len(results) >= limit:
            more = True
            break
        cursor = encode_cursor(spec, entry[:-1])
        end_cursor = cursor
        if skipped < offset:
            skipped += 1
            continue
        results.append((stored, cursor))
    return Page(results, skipped, more, end_cursor, examined)


def _range(
    entries: list[tuple], prefix: tuple, spec: IndexSpec, fixed: int, query_plan: Plan
) -> tuple[int, int]:
    """The slice of ``entries`` the equality prefix and the range filter select."""
    if query_plan.lower is None or query_plan.upper is None:
        return bisect.bisect_left(entries, prefix), bisect.bisect_left(entries, (*prefix, TOP))
    (low, low_inclusive), (high, high_inclusive) = query_plan.lower, query_plan.upper
    if spec[fixed][1]:
        # Descending column: the largest allowed value comes first.
        first = (*prefix, Desc(high)) if high_inclusive else (*prefix, Desc(high), TOP)
        last = (*prefix, Desc(low), TOP) if low_inclusive else (*prefix, Desc(low))
    else:
        first = (*prefix, low) if low_inclusive else (*prefix, low, TOP)
        last = (*prefix, high, TOP) if high_inclusive else (*prefix, high)
    return bisect.bisect_left(entries, first), bisect.bisect_left(entries, last)


def _after(entries: list[tuple], position: tuple) -> int:
    """The index of the first entry after a cursor's (columns..., key sort) position."""
    try:
        return bisect.bisect_left(entries, (*position, TOP))
    except TypeError as exc:
        raise invalid("the cursor does not fit this query") from exc


def _listed_before(
    stored: StoredEntity,
    kb: bytes,
    spec: IndexSpec,
    entries: list[tuple],
    range_start: int,
    stop: int,
) -> bool:
    """Whether the entity has an entry in ``entries[range_start:stop]`` (before the cursor)."""
    own = entries_for(types.Entity.pb(stored.entity), spec, kb)
    if len(own) < 2:
        return False
    return any(range_start <= bisect.bisect_left(entries, e) < stop for e in own)
