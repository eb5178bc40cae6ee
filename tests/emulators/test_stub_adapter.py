"""The Datastore emulator's use of inmemory-datastore-stub internals, pinned and checked.

When an upgrade of the stub breaks one of these, the failure names the internal and the pinned
version instead of surfacing as a wrong query result somewhere else.
"""

from __future__ import annotations

import pathlib
import re

import pytest
from google.cloud.datastore_v1 import types

from gae_deferred.local.datastore import _stub_adapter
from gae_deferred.local.datastore._store import StoredEntity
from gae_deferred.local.datastore._stub_adapter import (
    INTERNALS,
    PINNED_VERSION,
    LimitExceededError,
    StubQueryEngine,
    check_entity,
    check_lookup_keys,
)
from gae_deferred.local.errors import StubInternalsChanged

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_installed_and_required_versions_are_the_one_the_adapter_was_written_for() -> None:
    installed = _stub_adapter.installed_version()
    assert installed == PINNED_VERSION, (
        f"inmemory-datastore-stub {installed} is installed; emulators/datastore/_stub_adapter.py "
        f"was written against {PINNED_VERSION}: re-check its INTERNALS, then bump PINNED_VERSION"
    )
    for requirements in ("pyproject.toml", "requirements-dev.txt"):
        pins = re.findall(r"inmemory-datastore-stub==([\w.]+)", (ROOT / requirements).read_text())
        # Every extra that pulls the stub in (`local`, ...) pins the same version.
        assert pins and set(pins) == {PINNED_VERSION}, f"{requirements} pins {pins}"


@pytest.mark.parametrize(("module", "path", "parameters"), INTERNALS, ids=lambda v: str(v))
def test_every_internal_is_there_with_its_signature(module, path, parameters) -> None:
    assert callable(_stub_adapter._internal(module, path, parameters))


def test_a_missing_or_changed_internal_names_itself_and_the_pinned_version() -> None:
    with pytest.raises(StubInternalsChanged) as missing:
        _stub_adapter._internal("inmemory_datastore_stub._limits", "check_entities", ("entity",))
    assert "inmemory_datastore_stub._limits.check_entities is missing" in str(missing.value)
    assert f"inmemory-datastore-stub=={PINNED_VERSION}" in str(missing.value)

    with pytest.raises(StubInternalsChanged) as changed:
        _stub_adapter._internal("inmemory_datastore_stub._limits", "check_entity", ("value",))
    assert "check_entity takes (entity), expected (value, ...)" in str(changed.value)


def test_only_the_adapter_imports_the_stub() -> None:
    sources = (ROOT / "emulators").rglob("*.py")
    importers = {
        str(path.relative_to(ROOT))
        for path in sources
        if re.search(r"^\s*(from|import) inmemory_datastore_stub", path.read_text(), re.M)
    }
    assert importers == {"emulators/datastore/_stub_adapter.py"}


def _stored(name: str, n: int, tag: str, version: int) -> StoredEntity:
    entity = types.Entity(
        key=types.Key(
            partition_id=types.PartitionId(project_id="p"),
            path=[types.Key.PathElement(kind="K", name=name)],
        ),
        properties={"n": types.Value(integer_value=n), "tag": types.Value(string_value=tag)},
    )
    return StoredEntity(version=version, entity=entity)


def test_the_engine_orders_pages_and_projects_without_filtering() -> None:
    entities = [_stored(f"e{n}", n, "odd" if n % 2 else "even", n + 10) for n in range(6)]
    query = types.Query.pb()()
    query.kind.add(name="K")
    query.order.add(property={"name": "n"}, direction=types.PropertyOrder.Direction.DESCENDING)
    query.offset = 1
    query.limit.value = 2
    query.projection.add(property={"name": "n"})
    query.filter.property_filter.property.name = "tag"
    query.filter.property_filter.op = types.PropertyFilter.Operator.EQUAL
    query.filter.property_filter.value.string_value = "no entity has this"

    batch = StubQueryEngine().run(query, entities, seq=99).batch

    assert [r.entity.properties["n"].integer_value for r in batch.entity_results] == [4, 3]
    assert [set(r.entity.properties) for r in batch.entity_results] == [{"n"}, {"n"}]
    assert [r.version for r in batch.entity_results] == [14, 13]
    assert batch.skipped_results == 1
    assert batch.entity_result_type == types.EntityResult.ResultType.PROJECTION
    assert batch.more_results == types.QueryResultBatch.MoreResultsType.MORE_RESULTS_AFTER_LIMIT
    assert batch.snapshot_version == 99
    # The cursor of the last result resumes after it.
    query.start_cursor = batch.entity_results[-1].cursor
    query.offset = 0
    resumed = StubQueryEngine().run(query, entities, seq=99).batch
    assert [r.entity.properties["n"].integer_value for r in resumed.entity_results] == [2, 1]


def test_the_matcher_and_the_limits() -> None:
    stored = _stored("e1", 7, "odd", 1)
    engine = StubQueryEngine()
    gt = types.PropertyFilter(
        property=types.PropertyReference(name="n"),
        op=types.PropertyFilter.Operator.GREATER_THAN,
        value=types.Value(integer_value=5),
    )
    assert engine.matches_property_filter(stored, gt)
    gt.value = types.Value(integer_value=7)
    assert not engine.matches_property_filter(stored, gt)

    check_entity(stored.entity)
    too_big = types.Entity(key=stored.entity.key)
    too_big.properties["blob"] = types.Value(blob_value=b"x" * 1_100_000)
    with pytest.raises(LimitExceededError, match="byte limit"):
        check_entity(too_big)
    check_lookup_keys([stored.entity.key] * 1000)
    with pytest.raises(LimitExceededError, match="1000"):
        check_lookup_keys([stored.entity.key] * 1001)
