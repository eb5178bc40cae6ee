"""docs/backfills.md is true: its schema_update example, rewritten on iterate(), runs as it
stands (the block is read from the page), and its other claims have their tests in
test_iterate.py."""

from __future__ import annotations

import importlib
import logging
import re
import sys
from importlib import reload

import pytest
import webtest
from google.cloud import ndb

from gae_deferred import iteration, ndb_context
from gae_deferred.testing import capture_tasks
from tests.fixtures import ROOT

UPSTREAM = ROOT / "tests" / "ported" / "upstream"
PAGE = ROOT / "docs" / "backfills.md"
MODULE = "schema_update_iterate"


def _example() -> str:
    """The python block after the page's "Example" heading that defines the handler."""
    section = PAGE.read_text(encoding="utf-8").split("## Example", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    [example] = [block for block in blocks if "class UpdateSchemaHandler" in block]
    return example


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The page's example as an importable module (tasks pickle its functions by name)."""
    (tmp_path / f"{MODULE}.py").write_text(_example(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(UPSTREAM))
    module = importlib.import_module(MODULE)
    yield module
    sys.modules.pop(MODULE, None)


def test_the_schema_update_example_on_iterate_updates_every_picture_once(example, caplog):
    import schema_update_models_v1 as models_v1

    # On a Google emulator leg the capture uses that emulator, and opens no context of its own.
    with capture_tasks() as queue, ndb_context():
        reload(models_v1)
        ndb.put_multi(
            [models_v1.Picture(author=f"author {n}", name=f"picture {n}") for n in range(250)]
        )
        models_v2 = reload(importlib.import_module("schema_update_models_v2"))
        answer = webtest.TestApp(example.app).post("/update_schema")
        job_id = re.search(r"job (\w+)", answer.text).group(1)
        with caplog.at_level(logging.INFO):
            queue.run_all()
        pictures = models_v2.Picture.query().fetch()
        assert len(pictures) == 250
        assert {(p.num_votes, p.avg_rating) for p in pictures} == {(1, 5.0)}
        job = iteration.get_job(job_id)
        assert (job.name, job.state, job.shards, job.processed) == (
            "Picture schema v2",
            "done",
            8,
            250,
        )
        # once_per_entity left one marker per Picture for this job.
        markers = iteration.DeferredDone.query().fetch(keys_only=True)
        assert sum(marker.id().startswith(f"{job_id}:") for marker in markers) == 250
    assert f"schema update {job_id} complete: 250 updated, 0 failed" in caplog.text
