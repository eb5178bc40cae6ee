"""The ported apps on the real local stack: both emulators and gunicorn, with tests/ported and
tests/ported/upstream on the app's PYTHONPATH so their tasks unpickle there.

Tasks are deferred from this process, exactly as the apps' request handlers would defer them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
import schema_update_main
import upvote_change_set as change_set
from ported_fixtures import add_v1_pictures, change, remaining_changes, rule, updated_pictures
from upvote_stand_ins import Bit9Binary, constants

import gae_deferred as deferred
from gae_deferred import failures
from gae_deferred.local.stack import LocalStack
from tests.stack_support import ROOT, datastore, pointed_at, started_stack, wait_for

pytestmark = pytest.mark.e2e

PORTED = pathlib.Path(__file__).resolve().parent
#: Upvote's composite index for its change-set query (ancestor, ordered by recorded_dt).
UPVOTE_INDEXES = """
- kind: RuleChangeSet
  ancestor: yes
  properties:
  - name: recorded_dt
"""


@pytest.fixture(scope="session")
def ported_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    base = tmp_path_factory.mktemp("ported-stack")
    # gae_deferred's own indexes and the ported apps', as an app merges them into its index.yaml.
    index_yaml = base / "index.yaml"
    index_yaml.write_text((ROOT / "index.yaml").read_text() + UPVOTE_INDEXES)
    with started_stack(
        base,
        queue_yaml=PORTED / "queue.yaml",
        index_yaml=index_yaml,
        extra_pythonpath=[PORTED, PORTED / "upstream"],
    ) as stack:
        yield stack


@pytest.fixture
def on_stack(ported_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStack]:
    with pointed_at(ported_stack, monkeypatch):
        yield ported_stack


def test_schema_update_chain_runs_on_the_stack(on_stack):
    with datastore():
        add_v1_pictures(250)

    task = deferred.defer(schema_update_main.update_schema_task)

    assert not task.spilled
    with datastore():
        wait_for(lambda: len(updated_pictures()) == 250, "250 pictures on the v2 schema", 60)


def test_upvote_chain_stops_at_a_permanent_failure_inside_its_transaction(on_stack):
    policy = constants.RULE_POLICY
    with datastore():
        binary = Bit9Binary(id="sha256-e2e", file_catalog_id="1234")
        binary.put()
        local, global_ = rule(binary, "local", host_id="5678"), rule(binary, "global")
        change(binary, "c1", [global_], policy.WHITELIST)
        change(binary, "c2", [local, global_], policy.BLACKLIST)  # mixed: can never apply
        change(binary, "c3", [global_], policy.REMOVE)

    change_set.DeferCommitBlockableChangeSet(binary.key)

    def permanent_failure():
        records = failures.DeferredFailure.query().fetch()
        return [
            r
            for r in records
            if r.function == "upvote_change_set._CommitBlockableChangeSet"
            and r.state == "permanent"
        ]

    with datastore():
        [record] = wait_for(permanent_failure, "the permanent failure of the second change", 30)
        assert record.queue == constants.TASK_QUEUE.BIT9_COMMIT_CHANGE
        assert record.attempts == 1  # never retried
        assert remaining_changes(binary) == ["c2", "c3"]
        assert global_.key.get().is_committed and not local.key.get().is_committed
