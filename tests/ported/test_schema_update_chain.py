"""python-docs-samples' schema_update sample over several pages: each update_schema_task
re-saves one page of Pictures and defers the next with the page's ndb cursor. The ported test
(upstream/schema_update_main_test.py) has one entity, so one task; this chains three.

In memory here; test_ported_e2e.py runs the same chain on the local stack.
"""

from __future__ import annotations

from importlib import reload

import schema_update_main as main
import schema_update_models_v1 as models_v1
import schema_update_models_v2 as models_v2
import webtest
from google.cloud import ndb


def add_v1_pictures(count: int) -> None:
    reload(models_v1)
    ndb.put_multi(
        [models_v1.Picture(author=f"author {n}", name=f"picture {n}") for n in range(count)]
    )


def updated_pictures() -> list:
    reload(models_v2)
    return [p for p in models_v2.Picture.query().fetch() if p.num_votes == 1]


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
