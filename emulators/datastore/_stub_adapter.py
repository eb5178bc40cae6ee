"""Everything the emulator takes from ``inmemory-datastore-stub``, in one place.

The emulator reuses three things of the stub: its limit checks (entity size, indexed string
size, Lookup key count), its query engine for the queries no single index serves (it sorts,
pages and projects a list of entities) and its per-property filter matcher. Only
``LocalDatastoreStub`` and ``LimitExceededError`` are public; the rest are internals of the
pinned version, listed in :data:`INTERNALS`. No other emulator module imports the stub, and
``tests/emulators/test_stub_adapter.py`` checks every internal, so an upgrade that changes
one fails there, by name, instead of deep inside a query::

    engine = StubQueryEngine()
    response = engine.run(query_pb, stored_entities, snapshot_version)
    check_entity(entity_pb)            # raises LimitExceededError (INVALID_ARGUMENT)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from google.cloud.datastore_v1 import types

from ..errors import StubInternalsChanged

#: The stub version these internals were read from (pyproject.toml's `[local]` extra pins it).
PINNED_VERSION = "1.1.0"
DISTRIBUTION = "inmemory-datastore-stub"

#: Each private name used here: (module, attribute, parameters it must accept, in order).
INTERNALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("inmemory_datastore_stub._limits", "check_entity", ("entity",)),
    ("inmemory_datastore_stub._limits", "check_lookup_keys", ("keys",)),
    ("inmemory_datastore_stub.datastore_stub", "LocalDatastoreStub._run_query", ("request",)),
    (
        "inmemory_datastore_stub.datastore_stub",
        "LocalDatastoreStub._matches_property_filter",
        ("stored_obj", "prop_filter"),
    ),
    # _run_query reads entities from `self.store`; _EntityList stands in for this class.
    (
        "inmemory_datastore_stub._in_memory_store",
        "_InMemoryStore.items",
        ("transaction_id", "only_visible"),
    ),
    ("inmemory_datastore_stub._in_memory_store", "_InMemoryStore.seqid", ("transaction_id",)),
)


def _internal(module_name: str, path: str, parameters: Sequence[str]) -> Any:
    """The object at ``module_name``:``path``, checked to take ``parameters`` first."""
    where = f"{module_name}.{path}"
    try:
        found: Any = importlib.import_module(module_name)
        for part in path.split("."):
            found = getattr(found, part)
        names = [p for p in inspect.signature(found).parameters if p != "self"]
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise StubInternalsChanged(_changed(f"{where} is missing ({exc})")) from exc
    if names[: len(parameters)] != list(parameters):
        raise StubInternalsChanged(
            _changed(f"{where} takes ({', '.join(names)}), expected ({', '.join(parameters)}, ...)")
        )
    return found


def _changed(what: str) -> str:
    try:
        installed = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        installed = "not installed"
    return (
        f"{DISTRIBUTION} internals changed: {what}. gae_deferred.local.datastore was written "
        f"against {DISTRIBUTION}=={PINNED_VERSION} (installed: {installed}); pin that version "
        "or update emulators/datastore/_stub_adapter.py"
    )


def installed_version() -> str:
    """The installed stub's version (the test compares it with :data:`PINNED_VERSION`)."""
    return metadata.version(DISTRIBUTION)


try:
    from inmemory_datastore_stub import LimitExceededError, LocalDatastoreStub
except ImportError as _exc:
    raise StubInternalsChanged(_changed(f"its public API is missing ({_exc})")) from _exc

_resolved = {(module, path): _internal(module, path, params) for module, path, params in INTERNALS}
#: Entity limits (1 MiB entity, 1500-byte indexed strings, nesting, index entries).
check_entity: Callable[[types.Entity], None] = _resolved[
    ("inmemory_datastore_stub._limits", "check_entity")
]
#: At most 1000 keys per Lookup.
check_lookup_keys: Callable[[Sequence[types.Key]], None] = _resolved[
    ("inmemory_datastore_stub._limits", "check_lookup_keys")
]
del _resolved

__all__ = [
    "INTERNALS",
    "PINNED_VERSION",
    "LimitExceededError",
    "StubQueryEngine",
    "check_entity",
    "check_lookup_keys",
    "installed_version",
]


class _EntityList:
    """The store protocol the stub's engine reads (``items()`` and ``seqid()``), over a list."""

    def __init__(self, entities: Sequence[Any], seq: int) -> None:
        self._entities = entities
        self._seq = seq

    def items(self, transaction_id: bytes, only_visible: bool = False) -> list[tuple[None, Any]]:
        return [(None, stored) for stored in self._entities]

    def seqid(self, transaction_id: bytes | None) -> int:
        return self._seq


class StubQueryEngine:
    """The stub's query engine over entities the emulator already selected.

    Stored entities are anything with ``.entity`` (a proto-plus ``Entity``) and ``.version``.
    Callers serialize calls (the emulator holds its store lock).
    """

    def __init__(self) -> None:
        # No index.yaml (the emulator checks indexes itself) and no limits (it checks those on
        # write); eventual consistency off: Datastore queries here are strongly consistent.
        self._stub = LocalDatastoreStub(eventual_consistency=False, enforce_limits=False)

    def run(self, query: Any, entities: Sequence[Any], seq: int) -> Any:
        """Order, offset, limit, cursor and project ``entities`` as ``query`` (a Query protobuf)
        says; the filter is not applied. Returns a RunQueryResponse protobuf."""
        request = types.RunQueryRequest.pb()()
        request.query.CopyFrom(query)
        request.query.ClearField("filter")
        self._stub.store = _EntityList(entities, seq)
        try:
            response = self._stub._run_query(types.RunQueryRequest.wrap(request))
        finally:
            self._stub.store = _EntityList((), 0)
        return types.RunQueryResponse.pb(response)

    def matches_property_filter(self, stored: Any, prop_filter: types.PropertyFilter) -> bool:
        """Whether one stored entity passes one (non-``__key__``) property filter."""
        return self._stub._matches_property_filter(stored, prop_filter)
