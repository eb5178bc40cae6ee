"""Stand-ins for the parts of Upvote that its ported modules import (tests/ported/upstream).

Upvote's models, constants and Bit9 REST client pull in most of the app (BigQuery, users,
Bit9's HTTP API); the ported change_set.py and datastore/utils.py only need what is here:

- ``constants`` / ``bit9_constants``: the values Upvote defines (upvote/shared/constants.py and
  upvote/gae/lib/bit9/constants.py at the ported commit).
- ``rule_models`` / ``cert_models``: ndb models with the fields change_set.py reads and writes;
  rules record their BigQuery rows in ``BIGQUERY_ROWS``.
- ``api`` / ``bit9_utils``: an in-memory Bit9 server (``bit9_utils.CONTEXT``) with the query and
  put calls of Upvote's REST client; ``CONTEXT.fail_next`` makes the next call raise, as an
  unreachable Bit9 would.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, ClassVar

from google.cloud import ndb

# -- constants ---------------------------------------------------------------------------------


class _RulePolicy:
    WHITELIST = "WHITELIST"
    BLACKLIST = "BLACKLIST"
    REMOVE = "REMOVE"
    FORCE_INSTALLER = "FORCE_INSTALLER"
    FORCE_NOT_INSTALLER = "FORCE_NOT_INSTALLER"
    SET_INSTALLER = frozenset({FORCE_INSTALLER, FORCE_NOT_INSTALLER})


class _TaskQueue:
    DEFAULT = "default"
    BIT9_COMMIT_CHANGE = "bit9-commit-change"


class _ApprovalState:
    UNAPPROVED = 1
    APPROVED = 2
    BANNED = 3
    MAP_TO_STR: ClassVar[dict[int, str]] = {1: "UNAPPROVED", 2: "APPROVED", 3: "BANNED"}


constants = types.SimpleNamespace(RULE_POLICY=_RulePolicy, TASK_QUEUE=_TaskQueue)
bit9_constants = types.SimpleNamespace(APPROVAL_STATE=_ApprovalState)


# -- Datastore models --------------------------------------------------------------------------

#: BigQuery rows the rules inserted, as (rule id, comment).
BIGQUERY_ROWS: list[tuple[Any, str]] = []


class Bit9Binary(ndb.Model):
    file_catalog_id = ndb.StringProperty()


class Bit9Certificate(ndb.Model):
    file_catalog_id = ndb.StringProperty()


class Bit9Rule(ndb.Model):
    host_id = ndb.StringProperty()
    policy = ndb.StringProperty()
    is_committed = ndb.BooleanProperty(default=False)
    is_fulfilled = ndb.BooleanProperty()

    def InsertBigQueryRow(self, comment: str | None = None) -> None:
        BIGQUERY_ROWS.append((self.key.id(), comment))


class RuleChangeSet(ndb.Model):
    rule_keys = ndb.KeyProperty(repeated=True)
    change_type = ndb.StringProperty()
    recorded_dt = ndb.DateTimeProperty(auto_now_add=True)

    @property
    def blockable_key(self) -> ndb.Key:
        return self.key.parent()


rule_models = types.SimpleNamespace(Bit9Rule=Bit9Rule, RuleChangeSet=RuleChangeSet)
cert_models = types.SimpleNamespace(Bit9Certificate=Bit9Certificate)


# -- the Bit9 REST API -------------------------------------------------------------------------


class Bit9Server:
    """What Bit9 holds: objects by type, and the writes it received, in order."""

    def __init__(self) -> None:
        self.objects: dict[str, list[Bit9Object]] = {}
        self.writes: list[tuple[str, dict[str, Any]]] = []
        self.fail_next: Exception | None = None

    def check(self) -> None:
        failure, self.fail_next = self.fail_next, None
        if failure is not None:
            raise failure

    def reset(self) -> None:
        self.__init__()


class _Field:
    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, value: object) -> Callable[[Bit9Object], bool]:  # type: ignore[override]
        return lambda obj: getattr(obj, self.name) == value

    __hash__ = None  # type: ignore[assignment]


class _Query:
    def __init__(self, cls: type[Bit9Object]) -> None:
        self.cls = cls
        self.predicates: list[Callable[[Bit9Object], bool]] = []

    def filter(self, predicate: Callable[[Bit9Object], bool]) -> _Query:
        self.predicates.append(predicate)
        return self

    def execute(self, server: Bit9Server) -> list[Bit9Object]:
        server.check()
        return [
            obj
            for obj in server.objects.get(self.cls.__name__, [])
            if all(predicate(obj) for predicate in self.predicates)
        ]


class Bit9Object:
    """A Bit9 REST object: ``Cls.query().filter(Cls.field == v).execute(ctx)``, ``obj.put(ctx)``."""

    FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **values: Any) -> None:
        for name in self.FIELDS:
            setattr(self, name, values.get(name))

    def __init_subclass__(cls) -> None:
        for name in cls.FIELDS:
            setattr(cls, name, _Field(name))

    @classmethod
    def query(cls) -> _Query:
        return _Query(cls)

    def put(self, server: Bit9Server) -> Bit9Object:
        server.check()
        server.writes.append((type(self).__name__, {f: getattr(self, f) for f in self.FIELDS}))
        stored = server.objects.setdefault(type(self).__name__, [])
        if self not in stored:
            stored.append(self)
        return self


class FileInstance(Bit9Object):
    FIELDS = ("id", "file_catalog_id", "computer_id", "local_state")


class FileRule(Bit9Object):
    FIELDS = ("file_catalog_id", "file_state", "force_installer", "force_not_installer")


class Certificate(Bit9Object):
    FIELDS = ("thumbprint", "certificate_state")


api = types.SimpleNamespace(FileInstance=FileInstance, FileRule=FileRule, Certificate=Certificate)
bit9_utils = types.SimpleNamespace(CONTEXT=Bit9Server())


@dataclasses.dataclass
class _Counter:
    count: int = 0

    def Increment(self) -> None:
        self.count += 1


monitoring = types.SimpleNamespace(file_instances_missing=_Counter())
