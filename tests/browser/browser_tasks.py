"""Functions the dashboard browser tests defer. The stack's app imports this module too
as tests.browser.browser_tasks (the repository is on its PYTHONPATH), so tasks pickle by
reference like app functions.

    defer(browser_tasks.touch, str(run_dir), "spilled", os.urandom(200_000))
    defer(browser_tasks.broken_until_fixed, str(run_dir))   # PermanentTaskFailure until fixed
"""

from __future__ import annotations

import pathlib

import gae_deferred


def touch(run_dir: str, label: str, *payload: bytes) -> None:
    """Mark that this task ran: ``<run_dir>/<label>``."""
    (pathlib.Path(run_dir) / label).write_text("ran", encoding="utf-8")


def broken_until_fixed(run_dir: str) -> None:
    """Fails for good (no automatic retry) until ``<run_dir>/fixed`` exists, then succeeds."""
    folder = pathlib.Path(run_dir)
    if not (folder / "fixed").exists():
        raise gae_deferred.PermanentTaskFailure('not fixed yet <script>alert("x")</script>')
    (folder / "repaired").write_text("ran", encoding="utf-8")


def pause_for(run_dir: str, label: str, milliseconds: int) -> None:
    """Take ``milliseconds``, then mark the run: a task of known duration for the metrics."""
    import time

    time.sleep(milliseconds / 1000)
    touch(run_dir, label)


def fails_with(message: str) -> None:
    """Fail for good with ``message`` (searchable on the failures page)."""
    raise gae_deferred.PermanentTaskFailure(message)
