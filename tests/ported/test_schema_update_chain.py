"""python-docs-samples' schema_update sample over several pages: each update_schema_task
re-saves one page of Pictures and defers the next with the page's ndb cursor. The ported test
(upstream/schema_update_main_test.py) has one entity, so one task; this chains three.

In memory here; test_ported_e2e.py runs the same chain on the local stack.
"""

from __future__ import annotations

import schema_update_main as main
import webtest
from ported_fixtures import add_v1_pictures, updated_pictures


def test_update_schema_chains_one_task_per_page_with_cursors(deferred_tasks):
    add_v1_pictures(250)
    webtest.TestApp(main.app).post("/update_schema")

    [first] = deferred_tasks.tasks
    assert first.function == "schema_update_main.update_schema_task" and first.args == ""
    deferred_tasks.run(first)
    [second] = deferred_tasks.tasks
    assert "cursor=<google.cloud.ndb" in second.args and "num_updated=100" in second.args

    assert deferred_tasks.run_all() == 2
    pictures = updated_pictures()
    assert len(pictures) == 250
    assert {(p.num_votes, p.avg_rating) for p in pictures} == {(1, 5.0)}
