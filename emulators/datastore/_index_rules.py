"""Which queries Datastore serves without a composite index, and whether index.yaml has one.

The rules are App Engine's ``datastore_index`` (``CompositeIndexForQuery`` and
``MinimalCompositeIndexForQuery``), which the dev server and production share:

* Built-in indexes serve: kind-only and kindless queries, ancestor-only queries, queries with
  only equality filters (with or without an ancestor: a merge join of the single-property
  indexes), a single property filtered or sorted (either direction), ``__key__`` filters and
  an ascending ``__key__`` order (every index ends with the key), keys-only queries like
  their full form, and a projection on one property.
* Everything else needs a composite index: an ancestor with an inequality or a sort order,
  equality filters with an inequality or a sort order on another property, several sort
  orders, a descending ``__key__`` order, a projection on several properties.
* Normalisation first: an order on an equality-filtered property or after a ``__key__`` order
  changes nothing and is dropped; IN counts as equality, ``!=`` and NOT_IN as inequalities.
* A composite index serves a query when its last columns are the query's sort orders (an
  inequality column in either direction), then its projected properties in any order, and
  its other columns are equality-filtered properties. Several such indexes with the same last
  columns together serve a query (zigzag merge join) when they cover every equality filter,
  and for an ancestor query at least one of them is an ancestor index.
* OR filters are split into disjunctive normal form; each branch must be served.

::

    check(query_pb, indexes)   # raises RpcError(FAILED_PRECONDITION) naming the index to add
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from google.cloud.datastore_v1 import types

from ..errors import IndexYamlError, RpcError, invalid

ASCENDING = "asc"
DESCENDING = "desc"
KEY = "__key__"
#: Datastore refuses a query whose filter has more disjunctions than this in normal form.
MAX_DISJUNCTIONS = 30

_Op = types.PropertyFilter.Operator
_EQUALITY = (_Op.EQUAL, _Op.IN)
_INEQUALITY = (
    _Op.LESS_THAN,
    _Op.LESS_THAN_OR_EQUAL,
    _Op.GREATER_THAN,
    _Op.GREATER_THAN_OR_EQUAL,
    _Op.NOT_EQUAL,
    _Op.NOT_IN,
)
_OR = types.CompositeFilter.Operator.OR


@dataclass(frozen=True)
class CompositeIndex:
    """One index of index.yaml: properties are (name, "asc" | "desc") in index order."""

    kind: str
    ancestor: bool = False
    properties: tuple[tuple[str, str], ...] = ()

    def to_yaml(self) -> str:
        """The index as an index.yaml list entry."""
        lines = [f"- kind: {self.kind}"]
        if self.ancestor:
            lines.append("  ancestor: yes")
        lines.append("  properties:")
        for name, direction in self.properties:
            lines.append(f"  - name: {name}")
            if direction == DESCENDING:
                lines.append("    direction: desc")
        return "\n".join(lines)


def load_index_yaml(path: str | os.PathLike[str]) -> list[CompositeIndex]:
    """Read and validate an ``index.yaml``; raise IndexYamlError saying what is wrong.

    >>> load_index_yaml("index.yaml")  # doctest: +SKIP
    [CompositeIndex(kind='Task', ancestor=False, properties=(('done', 'asc'), ('due', 'desc')))]
    """
    path = Path(path)
    if not path.is_file():
        raise IndexYamlError(f"index.yaml not found: {path}")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise IndexYamlError(f"{path} is not valid YAML: {exc}") from exc
    if document is None:
        return []
    # `indexes:` with nothing under it (a fresh app's index.yaml) is YAML null: no indexes.
    if not isinstance(document, dict) or not isinstance(document.get("indexes") or [], list):
        raise IndexYamlError(f"{path}: expected a mapping with an 'indexes' list")
    indexes = []
    for position, entry in enumerate(document.get("indexes") or []):
        where = f"{path}: index #{position + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            raise IndexYamlError(f"{where} needs a 'kind' string")
        if not isinstance(entry.get("ancestor", False), bool):
            raise IndexYamlError(f"{where}: 'ancestor' must be yes or no")
        properties = entry.get("properties")
        if not isinstance(properties, list) or not properties:
            raise IndexYamlError(f"{where} ({entry['kind']}) needs a non-empty 'properties' list")
        columns = []
        for prop in properties:
            if not isinstance(prop, dict) or not isinstance(prop.get("name"), str):
                raise IndexYamlError(f"{where} ({entry['kind']}): each property needs a 'name'")
            direction = prop.get("direction", ASCENDING)
            if direction not in (ASCENDING, DESCENDING):
                raise IndexYamlError(
                    f"{where} ({entry['kind']}): direction of {prop['name']!r} must be asc or desc"
                )
            columns.append((prop["name"], direction))
        indexes.append(CompositeIndex(entry["kind"], entry.get("ancestor", False), tuple(columns)))
    return indexes


@dataclass(frozen=True)
class Requirement:
    """What a composite index must hold to serve one conjunctive query.

    ``ordered`` are the trailing sort columns, in order (direction None: either, for an
    inequality without a sort order); ``grouped`` (``distinct_on``) and ``unordered``
    (projected properties) follow as sets; ``prefix`` are the equality-filtered properties,
    in any order, before all of them.
    """

    kind: str
    ancestor: bool
    prefix: frozenset[str]
    ordered: tuple[tuple[str, str | None], ...]
    grouped: frozenset[str]
    unordered: frozenset[str]

    def recommended(self) -> CompositeIndex:
        """The index Datastore recommends: equality properties by name, then the postfix."""
        columns = [(name, ASCENDING) for name in sorted(self.prefix)]
        columns += [(name, direction or ASCENDING) for name, direction in self.ordered]
        columns += [(name, ASCENDING) for name in sorted(self.grouped)]
        columns += [(name, ASCENDING) for name in sorted(self.unordered)]
        return CompositeIndex(self.kind, self.ancestor, tuple(columns))

    def _index_prefix(self, index: CompositeIndex) -> list[str] | None:
        """The names before the postfix when ``index`` ends with it, else None."""
        columns = list(index.properties)
        for group in (self.unordered, self.grouped):
            tail = columns[len(columns) - len(group) :] if group else []
            if {name for name, _ in tail} != group:
                return None
            columns = columns[: len(columns) - len(group)]
        if len(columns) < len(self.ordered):
            return None
        tail = columns[len(columns) - len(self.ordered) :]
        for (name, direction), (wanted, wanted_direction) in zip(tail, self.ordered, strict=True):
            if name != wanted or wanted_direction not in (None, direction):
                return None
        return [name for name, _ in columns[: len(columns) - len(self.ordered)]]

    def served_by(self, indexes: list[CompositeIndex]) -> bool:
        """Whether the declared indexes serve this query, alone or merge-joined."""
        left_per_postfix: dict[tuple, tuple[frozenset[str], bool]] = {}
        for index in indexes:
            if index.kind != self.kind or (index.ancestor and not self.ancestor):
                continue
            prefix = self._index_prefix(index)
            if prefix is None or not set(prefix) <= self.prefix:
                continue
            postfix = index.properties[len(prefix) :]
            props_left, ancestor_left = left_per_postfix.get(postfix, (self.prefix, self.ancestor))
            props_left = props_left - set(prefix)
            ancestor_left = ancestor_left and not index.ancestor
            if not props_left and not ancestor_left:
                return True
            left_per_postfix[postfix] = (props_left, ancestor_left)
        return False


def requirement(
    kind: str | None,
    ancestor: bool,
    filters: list[tuple[str, int]],
    orders: list[tuple[str, str]],
    projection: list[str],
    distinct_on: list[str],
) -> Requirement | None:
    """The composite index a conjunctive query needs, or None when built-in indexes serve it.

    ``filters`` are (property, operator) without the ancestor filter; ``orders`` are
    (property, "asc" | "desc"); ``projection`` leaves out ``__key__`` (keys-only queries use
    the indexes of their full form).
    """
    if not kind:
        return None
    equal = {name for name, op in filters if op in _EQUALITY}
    unequal = sorted({name for name, op in filters if op in _INEQUALITY})
    equal -= set(unequal)

    # Orders on equality properties, repeated orders and orders after __key__ change nothing.
    seen = set(equal)
    kept: list[tuple[str, str]] = []
    for name, direction in orders:
        if name not in seen:
            seen.add(name)
            kept.append((name, direction))
    if KEY in equal:
        kept = []
    if any(name == KEY for name, _ in kept):
        kept = kept[: [name for name, _ in kept].index(KEY) + 1]
    seen.update(unequal)
    needed: list[str] = []
    for name in [*projection, *distinct_on]:
        if name not in seen:
            seen.add(name)
            needed.append(name)

    if not needed:
        # Every index ends with the key: an ascending key order and key filters are free,
        # unless a property inequality or a descending key order decides the index order.
        key_descending = bool(kept) and kept[-1] == (KEY, DESCENDING)
        if kept and kept[-1] == (KEY, ASCENDING):
            kept.pop()
        if not key_descending and all(name == KEY for name in unequal):
            equal.discard(KEY)
            unequal = [name for name in unequal if name != KEY]

    if not unequal and not needed and not kept and KEY not in equal:
        return None  # equality filters only: a merge join of built-in indexes
    ordered: list[tuple[str, str | None]] = list(kept)
    ordered += [(name, None) for name in unequal if name not in {n for n, _ in kept}]
    grouped = frozenset(name for name in needed if name in distinct_on)
    unordered = frozenset(needed) - grouped
    count = len(equal) + len(ordered) + len(grouped) + len(unordered)
    if not ancestor and count <= 1 and ordered != [(KEY, DESCENDING)]:
        return None  # one property: its built-in index, in either direction
    return Requirement(kind, ancestor, frozenset(equal), tuple(ordered), grouped, unordered)


def check(query: types.Query, indexes: list[CompositeIndex]) -> None:
    """Raise FAILED_PRECONDITION, with the index to add, unless ``indexes`` serve ``query``.

    ``query`` is a Query protobuf (not proto-plus).
    """
    kind = query.kind[0].name if query.kind else None
    descending = types.PropertyOrder.Direction.DESCENDING
    orders = [
        (order.property.name, DESCENDING if order.direction == descending else ASCENDING)
        for order in query.order
    ]
    projection = [p.property.name for p in query.projection if p.property.name != KEY]
    distinct_on = [p.name for p in query.distinct_on]
    for branch in _disjunctive_normal_form(query.filter):
        ancestor = any(f.op == _Op.HAS_ANCESTOR for f in branch)
        filters = [(f.property.name, f.op) for f in branch if f.op != _Op.HAS_ANCESTOR]
        needed = requirement(kind, ancestor, filters, orders, projection, distinct_on)
        if needed is not None and not needed.served_by(indexes):
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no matching index found. recommended index is:\n"
                f"{needed.recommended().to_yaml()}\n"
                "(add it to index.yaml; production refuses this query without it too)",
            )


def _disjunctive_normal_form(query_filter) -> list[list]:
    """The filter as OR of ANDs: a list of branches, each a list of property filters."""
    which = query_filter.WhichOneof("filter_type")
    if which is None:
        return [[]]
    if which == "property_filter":
        return [[query_filter.property_filter]]
    composite = query_filter.composite_filter
    parts = [_disjunctive_normal_form(sub) for sub in composite.filters]
    sizes = [len(part) for part in parts]
    count = sum(sizes) if composite.op == _OR else math.prod(sizes)
    if count > MAX_DISJUNCTIONS:
        raise invalid(
            f"the query's filter has {count} disjunctions in normal form; "
            f"Datastore allows at most {MAX_DISJUNCTIONS}"
        )
    if composite.op == _OR:
        return [branch for part in parts for branch in part]
    return [
        [f for branch in combination for f in branch] for combination in itertools.product(*parts)
    ]
