"""Helpers that the ported suites' test modules share: data of the schema_update sample and of
Upvote's rule changes. Imported by top-level name, like the ported modules (tests/ported is on
sys.path; see conftest.py).
"""

from __future__ import annotations

from importlib import reload

import schema_update_models_v1 as models_v1
import schema_update_models_v2 as models_v2
from google.cloud import ndb
from upvote_stand_ins import Bit9Binary, Bit9Rule, RuleChangeSet, constants

POLICY = constants.RULE_POLICY


def add_v1_pictures(count: int) -> None:
    reload(models_v1)
    ndb.put_multi(
        [models_v1.Picture(author=f"author {n}", name=f"picture {n}") for n in range(count)]
    )


def updated_pictures() -> list:
    reload(models_v2)
    return [p for p in models_v2.Picture.query().fetch() if p.num_votes == 1]


def rule(binary: Bit9Binary, rule_id: str, host_id: str | None = None) -> Bit9Rule:
    created = Bit9Rule(id=rule_id, parent=binary.key, host_id=host_id, policy=POLICY.WHITELIST)
    created.put()
    return created


def change(binary: Bit9Binary, change_id: str, rules: list[Bit9Rule], change_type: str) -> None:
    RuleChangeSet(
        id=change_id,
        parent=binary.key,
        rule_keys=[r.key for r in rules],
        change_type=change_type,
    ).put()


def remaining_changes(binary: Bit9Binary) -> list[str]:
    return [c.key.id() for c in RuleChangeSet.query(ancestor=binary.key).order("recorded_dt")]
