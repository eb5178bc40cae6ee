"""Sorted in-memory indexes over the entities of one kind, as Datastore serves queries from.

An index is a :class:`IndexSpec` (property names with a direction) and a sorted list of
entries ``(*column values, key sort tuple, key bytes)``; an entity has one entry per
combination of its indexed values (list properties give one entry per value), none when a
property is missing or excluded from indexes. Values are encoded into tuples that Python
orders the way Datastore orders values across types::

    null < numbers (integers and doubles, numerically) < timestamps < booleans
         < strings < bytes < keys < geo points

Descending columns wrap their value in :class:`Desc`, so every index is one ascending list
and a query reads a contiguous slice of it::

    index = SortedIndex((("state", False), ("created", True)))
    index.add(entity_pb, key_bytes(entity_pb.key))
    start = bisect.bisect_left(index.entries, (encode(state_value),))
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import itertools
import json
import math
from collections.abc import Iterable

from google.cloud.datastore_v1.types import entity as entity_types

from ..errors import invalid

_EntityPb = entity_types.Entity.pb()
_ValuePb = entity_types.Value.pb()

#: (property name, descending) per column, in index order.
IndexSpec = tuple[tuple[str, bool], ...]


def path_sort_key(path: Iterable) -> tuple:
    """Datastore's key order: element by element, kind, then ids before names."""
    return tuple((e.kind, 1, e.name, 0) if e.name else (e.kind, 0, "", e.id) for e in path)


_NULL, _NUMBER, _TIMESTAMP, _BOOLEAN, _STRING, _BYTES, _KEY, _GEO = range(8)


class Top:
    """Greater than every encoded value: ``(*prefix, TOP)`` sorts after all of ``prefix``."""

    __slots__ = ()

    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return other is not self

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "TOP"


TOP = Top()


class Desc:
    """An encoded value in a descending column: orders in reverse of the value it wraps."""

    __slots__ = ("value",)

    def __init__(self, value: tuple) -> None:
        self.value = value

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Desc):
            return NotImplemented
        return other.value < self.value

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Desc):
            return NotImplemented
        return self.value < other.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Desc) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"Desc({self.value!r})"


def encode(value: _ValuePb) -> tuple | None:
    """The order-preserving form of one Value, or None for values no index holds.

    >>> encode(_ValuePb(integer_value=3)) < encode(_ValuePb(string_value="a"))
    True
    """
    which = value.WhichOneof("value_type")
    if which == "null_value" or which is None:
        return (_NULL,)
    if which == "integer_value":
        return (_NUMBER, 1, value.integer_value)
    if which == "double_value":
        number = value.double_value
        # NaN sorts after every other number, +inf included, as Google's Firestore emulator in
        # Datastore mode orders it (Firestore in native mode puts it first).
        return (_NUMBER, 2, 0) if math.isnan(number) else (_NUMBER, 1, number)
    if which == "timestamp_value":
        return (_TIMESTAMP, value.timestamp_value.seconds, value.timestamp_value.nanos)
    if which == "boolean_value":
        return (_BOOLEAN, value.boolean_value)
    if which == "string_value":
        return (_STRING, value.string_value)
    if which == "blob_value":
        return (_BYTES, value.blob_value)
    if which == "key_value":
        pid = value.key_value.partition_id
        partition = (pid.project_id, pid.database_id, pid.namespace_id)
        return (_KEY, partition, path_sort_key(value.key_value.path))
    if which == "geo_point_value":
        return (_GEO, value.geo_point_value.latitude, value.geo_point_value.longitude)
    # Embedded entities and nested arrays have no single-value index entry.
    return None


def indexed_values(entity: _EntityPb, name: str) -> list[tuple]:
    """The distinct encoded values an index holds for property ``name`` of ``entity``."""
    if name not in entity.properties:
        return []
    value = entity.properties[name]
    if value.exclude_from_indexes:
        return []
    if value.WhichOneof("value_type") == "array_value":
        candidates: Iterable[_ValuePb] = (
            v for v in value.array_value.values if not v.exclude_from_indexes
        )
    else:
        candidates = (value,)
    found = []
    for candidate in candidates:
        encoded = encode(candidate)
        if encoded is not None and encoded not in found:
            found.append(encoded)
    return found


def column(value: tuple, descending: bool) -> tuple | Desc:
    """How ``value`` is stored in a column of the given direction."""
    return Desc(value) if descending else value


def entries_for(entity: _EntityPb, spec: IndexSpec, kb: bytes) -> list[tuple]:
    """Every index entry of ``entity`` in an index of shape ``spec``."""
    keysort = path_sort_key(entity.key.path)
    columns = []
    for name, descending in spec:
        values = indexed_values(entity, name)
        if not values:
            return []
        columns.append([column(v, descending) for v in values])
    return [(*combination, keysort, kb) for combination in itertools.product(*columns)]


class SortedIndex:
    """One index: its spec and its entries in order (bisect on a plain list)."""

    def __init__(self, spec: IndexSpec) -> None:
        self.spec = spec
        self.entries: list[tuple] = []

    def build(self, entities: dict[bytes, _EntityPb]) -> None:
        """Fill the index from scratch (first use, or load)."""
        self.entries = sorted(
            entry for kb, entity in entities.items() for entry in entries_for(entity, self.spec, kb)
        )

    def add(self, entity: _EntityPb, kb: bytes) -> None:
        for entry in entries_for(entity, self.spec, kb):
            bisect.insort(self.entries, entry)

    def remove(self, entity: _EntityPb, kb: bytes) -> None:
        for entry in entries_for(entity, self.spec, kb):
            position = bisect.bisect_left(self.entries, entry)
            if position < len(self.entries) and self.entries[position] == entry:
                del self.entries[position]


# -- cursors ------------------------------------------------------------------------------

_CURSOR_PREFIX = b"ix1:"


def spec_fingerprint(spec: IndexSpec) -> str:
    """A short id of an index shape, so a cursor is only accepted by queries on that index."""
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:12]


def encode_cursor(spec: IndexSpec, position: tuple) -> bytes:
    """A cursor just after the index entry whose sort part (columns..., key) is ``position``.

    Columns are stored unwrapped (the spec says which are descending); the key bytes are
    not needed because the key sort tuple already identifies the entity.
    """
    plain = [v.value if isinstance(v, Desc) else v for v in position]
    body = json.dumps([spec_fingerprint(spec), _dump(plain)], separators=(",", ":"))
    return _CURSOR_PREFIX + body.encode()


def is_index_cursor(cursor: bytes) -> bool:
    return cursor.startswith(_CURSOR_PREFIX)


def decode_cursor(cursor: bytes, spec: IndexSpec) -> tuple:
    """The ``(*columns, key sort tuple)`` a cursor from :func:`encode_cursor` points after.

    Raises INVALID_ARGUMENT for a cursor that is not ours or belongs to another query shape.
    """
    if not is_index_cursor(cursor):
        raise invalid("the cursor is not valid for this query")
    try:
        fingerprint, raw = json.loads(cursor[len(_CURSOR_PREFIX) :].decode())
        values = _load(raw)
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError) as exc:
        raise invalid("the cursor is malformed") from exc
    if fingerprint != spec_fingerprint(spec) or not isinstance(values, tuple):
        raise invalid("the cursor belongs to another query")
    if len(values) != len(spec) + 1:
        raise invalid("the cursor is malformed")
    columns = tuple(column(v, d) for v, (_, d) in zip(values, spec, strict=False))
    return (*columns, values[-1])


def _dump(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_dump(v) for v in value]
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode()}
    if isinstance(value, float):
        return {"f": repr(value)}
    return value


def _load(value: object) -> object:
    if isinstance(value, list):
        return tuple(_load(v) for v in value)
    if isinstance(value, dict):
        if set(value) == {"b"} and isinstance(value["b"], str):
            return base64.b64decode(value["b"], validate=True)
        if set(value) == {"f"} and isinstance(value["f"], str):
            return float(value["f"])
        raise ValueError("unknown cursor value")
    if value is None or isinstance(value, bool | int | str):
        return value
    raise ValueError("unknown cursor value")
