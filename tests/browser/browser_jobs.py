"""The kind and functions of the Jobs page's browser test. The stack's app imports this module
too, as tests.browser.browser_jobs (the repository is on its PYTHONPATH), so iterate() pickles
them by reference.

    iterate(BrowserItem.query(BrowserItem.run == run), slow_touch, shards=4, batch_size=5)
"""

from __future__ import annotations

import time

from google.cloud import ndb

import gae_deferred


class BrowserItem(ndb.Model):
    """One entity a job walks; ``run`` tells the test's runs apart, ``touched`` counts visits."""

    run = ndb.StringProperty()
    touched = ndb.IntegerProperty(default=0)
    broken = ndb.BooleanProperty(default=False)


class BrowserJobDone(ndb.Model):
    """What finalize wrote (id: the job id)."""

    processed = ndb.IntegerProperty()
    failed = ndb.IntegerProperty()


def slow_touch(item: BrowserItem) -> None:
    """fn(entity): take 50 ms (a job the test can pause while it runs), then count the visit;
    a broken item fails for good at once (recorded and skipped)."""
    if item.broken:
        raise gae_deferred.PermanentTaskFailure(f"item {item.key.id()} cannot be migrated")
    time.sleep(0.05)
    item.touched += 1
    item.put()


def record_done(totals: gae_deferred.JobTotals) -> None:
    """finalize: keep the totals."""
    BrowserJobDone(id=totals.job_id, processed=totals.processed, failed=totals.failed).put()
