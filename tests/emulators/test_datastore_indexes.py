"""Which queries the Datastore emulator serves without a composite index, through real ndb.

The emulator runs with an index.yaml, as `make run` does: every query production serves from
built-in indexes must run, every query production refuses for lack of a composite index must be
refused with the index to add (emulators/datastore/_index_rules.py has the rules).
"""

from __future__ import annotations

import pathlib

import pytest
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import ndb
from google.cloud.datastore_v1 import types
from google.cloud.ndb import exceptions as ndb_exceptions

from gae_deferred.local.datastore import DatastoreEmulator
from gae_deferred.local.datastore._index_rules import requirement

PROJECT = "index-rules"


class IdxThing(ndb.Model):
    a = ndb.IntegerProperty()
    b = ndb.StringProperty()
    c = ndb.IntegerProperty()
    done = ndb.BooleanProperty()


class IdxOther(ndb.Model):
    x = ndb.IntegerProperty()


# An unrelated composite index: the emulator checks every query against this file.
UNRELATED = "indexes:\n- kind: IdxOther\n  properties:\n  - name: x\n  - name: x2\n"


@pytest.fixture
def context(tmp_path, monkeypatch):
    """An ndb context on an emulator with UNRELATED as index.yaml and a few entities."""
    with _running(tmp_path, monkeypatch, UNRELATED) as parent:
        yield parent


class _running:
    """Start an emulator with ``index_yaml``, open an ndb context, seed; yields the parent."""

    def __init__(self, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, text: str):
        path = tmp_path / f"index-{abs(hash(text))}.yaml"
        path.write_text(text)
        self.emulator = DatastoreEmulator(port=0, index_yaml=path)
        self.monkeypatch = monkeypatch

    def __enter__(self) -> ndb.Key:
        self.emulator.start()
        self.monkeypatch.setenv("DATASTORE_EMULATOR_HOST", self.emulator.address)
        client = ndb.Client(project=PROJECT, credentials=AnonymousCredentials())
        self._context = client.context(cache_policy=False, global_cache_policy=False)
        self._context.__enter__()
        parent = IdxOther(id="parent", x=0).put()
        rows = [(1, "x", 5, False), (1, "y", 3, True), (2, "x", 4, False), (3, "y", 1, False)]
        for position, (a, b, c, done) in enumerate(rows):
            IdxThing(id=f"child{position}", parent=parent, a=a, b=b, c=c, done=done).put()
        IdxThing(id="orphan", a=1, b="x", c=9, done=False).put()
        return parent

    def __exit__(self, *exc_info: object) -> None:
        self._context.__exit__(*exc_info)
        self.emulator.stop()


def _ids(entities) -> list[str]:
    return [(e.key if isinstance(e, ndb.Model) else e).id() for e in entities]


T = IdxThing


def test_queries_built_in_indexes_serve_run(context: ndb.Key) -> None:
    parent = context
    # The issue: equality filter + ancestor, a merge join in production.
    pending = T.query(T.done == False, ancestor=parent).fetch()  # noqa: E712
    assert sorted(_ids(pending)) == ["child0", "child2", "child3"]

    assert len(T.query().fetch()) == 5  # kind only
    assert len(T.query().fetch(keys_only=True)) == 5
    assert sorted(_ids(T.query(ancestor=parent))) == ["child0", "child1", "child2", "child3"]
    assert len(T.query(T.a == 1).fetch()) == 3  # one property
    assert [e.c for e in T.query(T.c > 3)] == [4, 5, 9]
    assert [e.c for e in T.query().order(-T.c)] == [9, 5, 4, 3, 1]
    assert [e.c for e in T.query(T.c > 3).order(-T.c)] == [9, 5, 4]
    assert [e.a for e in T.query().order(T.a)] == [1, 1, 1, 2, 3]
    # Equality filters on several properties (merge join), also keys-only, with an ancestor,
    # and with an order on a filtered property (which changes nothing).
    assert sorted(_ids(T.query(T.a == 1, T.b == "x"))) == ["child0", "orphan"]
    assert sorted(_ids(T.query(T.a == 1, T.b == "x").fetch(keys_only=True))) == [
        "child0",
        "orphan",
    ]
    assert _ids(T.query(T.a == 1, T.b == "x", ancestor=parent)) == ["child0"]
    assert sorted(_ids(T.query(T.a == 1, T.b == "x").order(T.a))) == ["child0", "orphan"]
    # __key__: filters and an ascending order ride on any index.
    # (Keys order by path: IdxOther:parent/... sorts before IdxThing:orphan.)
    after_child0 = T.query(T.a == 1, T.key > ndb.Key(T, "child0", parent=parent))
    assert _ids(after_child0) == ["child1", "orphan"]
    assert _ids(T.query(T.a == 1, T.b == "x").order(T.key)) == ["child0", "orphan"]
    assert sorted(e.c for e in T.query().fetch(projection=[T.c])) == [1, 3, 4, 5, 9]
    assert sorted(_ids(T.query(T.a.IN([2, 3])))) == ["child2", "child3"]
    assert sorted(_ids(T.query(ndb.OR(T.a == 3, T.b == "y")))) == ["child1", "child3"]


@pytest.mark.parametrize(
    ("make_query", "fetch_options", "recommended"),
    [
        pytest.param(
            lambda parent: T.query(T.c > 1, ancestor=parent),
            {},
            "- kind: IdxThing\n  ancestor: yes\n  properties:\n  - name: c\n",
            id="ancestor+inequality",
        ),
        pytest.param(
            lambda parent: T.query(ancestor=parent).order(-T.c),
            {},
            "- kind: IdxThing\n  ancestor: yes\n  properties:\n  - name: c\n    direction: desc\n",
            id="ancestor+sort",
        ),
        pytest.param(
            lambda parent: T.query(T.done == False, ancestor=parent).order(T.c),  # noqa: E712
            {"keys_only": True},
            "- kind: IdxThing\n  ancestor: yes\n  properties:\n  - name: done\n  - name: c\n",
            id="ancestor+equality+sort, keys-only",
        ),
        pytest.param(
            lambda parent: T.query(T.a == 1, T.c > 2),
            {},
            "- kind: IdxThing\n  properties:\n  - name: a\n  - name: c\n",
            id="equality+inequality",
        ),
        pytest.param(
            lambda parent: T.query(T.b == "x").order(-T.c),
            {},
            "- kind: IdxThing\n  properties:\n  - name: b\n  - name: c\n    direction: desc\n",
            id="equality+sort",
        ),
        pytest.param(
            lambda parent: T.query().order(T.a, -T.c),
            {},
            "- kind: IdxThing\n  properties:\n  - name: a\n  - name: c\n    direction: desc\n",
            id="two sort orders",
        ),
        pytest.param(
            lambda parent: T.query().order(-T.key),
            {},
            "- kind: IdxThing\n  properties:\n  - name: __key__\n    direction: desc\n",
            id="descending key",
        ),
        pytest.param(
            lambda parent: T.query(),
            {"projection": [T.a, T.c]},
            "- kind: IdxThing\n  properties:\n  - name: a\n  - name: c\n",
            id="projection on two properties",
        ),
        pytest.param(
            lambda parent: T.query(T.b == "x"),
            {"projection": [T.c]},
            "- kind: IdxThing\n  properties:\n  - name: b\n  - name: c\n",
            id="equality+projection",
        ),
        pytest.param(
            lambda parent: T.query(ndb.OR(T.a == 1, T.b == "y")).order(T.c),
            {},
            # Either branch may be refused first: both need an index with the sort.
            (
                "- kind: IdxThing\n  properties:\n  - name: a\n  - name: c\n",
                "- kind: IdxThing\n  properties:\n  - name: b\n  - name: c\n",
            ),
            id="OR branch with sort",
        ),
    ],
)
def test_queries_production_refuses_are_refused_with_the_index_to_add(
    context: ndb.Key, make_query, fetch_options, recommended
) -> None:
    # An OR query runs its branches at once: when the refused branch fails inside ndb's retry
    # of another, ndb wraps the same FAILED_PRECONDITION in a NestedRetryException.
    with pytest.raises(
        (exceptions.FailedPrecondition, ndb_exceptions.NestedRetryException)
    ) as caught:
        make_query(context).fetch(**fetch_options)
    message = str(caught.value)
    assert "no matching index found" in message
    choices = recommended if isinstance(recommended, tuple) else (recommended,)
    assert any(choice in message + "\n" for choice in choices), message


DECLARED = """indexes:
- kind: IdxThing
  ancestor: yes
  properties:
  - name: c
    direction: desc
- kind: IdxThing
  properties:
  - name: a
  - name: c
- kind: IdxThing
  properties:
  - name: b
  - name: c
"""


def test_declared_indexes_serve_alone_or_merge_joined(tmp_path, monkeypatch) -> None:
    with _running(tmp_path, monkeypatch, DECLARED) as parent:
        # The ancestor index serves a sort and (in either direction) an inequality.
        assert [e.c for e in T.query(ancestor=parent).order(-T.c)] == [5, 4, 3, 1]
        assert sorted(e.c for e in T.query(T.c > 3, ancestor=parent)) == [4, 5]
        # (a, c) and (b, c) end alike: together they serve a == 1 AND b == "x" ORDER BY c.
        found = T.query(T.a == 1, T.b == "x").order(T.c).fetch()
        assert [e.c for e in found] == [5, 9]
        # Neither holds a descending c, so the reverse order still needs its own index.
        with pytest.raises(exceptions.FailedPrecondition, match="no matching index found"):
            T.query(T.a == 1, T.b == "x").order(-T.c).fetch()
        # An ancestor query needs an ancestor index among the merged ones.
        with pytest.raises(exceptions.FailedPrecondition, match="ancestor: yes"):
            T.query(T.a == 1, ancestor=parent).order(T.c).fetch()


_Op = types.PropertyFilter.Operator
_EQ, _GT, _NE = _Op.EQUAL, _Op.GREATER_THAN, _Op.NOT_EQUAL


@pytest.mark.parametrize(
    ("args", "needed"),
    [
        (("K", False, [], [], [], []), None),
        ((None, True, [("__key__", _GT)], [], [], []), None),  # kindless
        (("K", False, [("__key__", _GT)], [("__key__", "asc")], [], []), None),
        (("K", False, [("a", _EQ), ("__key__", _GT)], [], [], []), None),
        (("K", False, [("a", _GT), ("__key__", _GT)], [], [], []), ["__key__", "a"]),
        (("K", False, [("a", _NE)], [], [], []), None),
        (("K", False, [("a", _NE), ("b", _EQ)], [], [], []), ["b", "a"]),
        (("K", False, [("a", _EQ)], [("a", "desc"), ("b", "asc")], [], []), ["a", "b"]),
        (("K", False, [("__key__", _EQ)], [("b", "asc"), ("c", "asc")], [], []), None),
        (("K", False, [], [("a", "asc"), ("__key__", "asc"), ("c", "asc")], [], []), None),
        (("K", False, [], [("a", "asc"), ("__key__", "desc")], [], []), ["a", "__key__"]),
        (("K", False, [], [], ["a"], ["a"]), None),
        (("K", False, [], [], ["a", "b"], ["a"]), ["a", "b"]),
        (("K", True, [], [], ["a"], []), ["a"]),
    ],
)
def test_rule_edges(args, needed) -> None:
    """Key filters and orders, !=, distinct_on, kindless: the rules without a round trip."""
    found = requirement(*args)
    if needed is None:
        assert found is None
    else:
        assert found is not None
        assert [name for name, _ in found.recommended().properties] == needed
