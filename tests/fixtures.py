"""Helpers that several test modules share (as rq's tests/fixtures.py): a test module imports
them from here, never from another test module; pytest fixtures live in the conftest.py files.

The browser helpers drive a page of the real local stack (tests/browser); they need no browser
to import.
"""

from __future__ import annotations

import datetime
import json
import zlib
from collections.abc import Callable

from gae_deferred import FailureState, envelope, failures
from tests import stack_support
from tests.browser import browser_tasks
from tests.stack_support import ROOT

#: The X-AppEngine-* headers of a task delivery the handler accepts.
TASK = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "task-1"}

#: Task bodies the python27 legacy library wrote (tests/legacy_py2/bodies.json), by name;
#: ``python`` is the version that wrote them.
BODIES = {
    name: value if name == "python" else bytes.fromhex(value)
    for name, value in json.loads((ROOT / "tests/legacy_py2/bodies.json").read_text()).items()
}

#: What :func:`collect` received, call by call (test modules clear it before each test).
RESULTS: list = []


def collect(*args: object) -> None:
    """A deferrable function that records its arguments in :data:`RESULTS`."""
    RESULTS.append(args)


def zlib_bomb(inflated: int) -> bytes:
    """zlib data that inflates to ``inflated`` zero bytes (a multiple of 16 MiB)."""
    packer = zlib.compressobj(9)
    block = b"\0" * (16 << 20)
    parts = [packer.compress(block) for _ in range(inflated // len(block))]
    return b"".join([*parts, packer.flush()])


# -- the dashboard in a browser --------------------------------------------------------------

SCREENSHOTS = ROOT / "test-output" / "screenshots"


def wait_for(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """:func:`tests.stack_support.wait_for` with the browser tests' longer default: their
    waits include a task's run in the stack's app."""
    stack_support.wait_for(check, what, timeout=timeout)


def shoot(page, name: str) -> None:
    """Save the page at desktop and phone widths."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 800})
    page.screenshot(path=str(SCREENSHOTS / f"{name}-1280.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(SCREENSHOTS / f"{name}-390.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})


def failure_record(record_id: str, function: str, message: str, queue: str = "default") -> str:
    """A permanent failure of ``function`` in the stack's Datastore, with its group and its kept
    payload (a call of browser_tasks.fails_with); returns its id."""
    data = envelope.serialize(browser_tasks.fails_with, message)
    now = datetime.datetime.now(datetime.UTC)
    with stack_support.datastore():
        record = failures.update(
            None,
            record_id,
            function=function,
            exception_type="gae_deferred.errors.PermanentTaskFailure",
            message=message,
            traceback=f"Traceback (most recent call last):\n{message}",
            state=FailureState.PERMANENT,
            task_name=f"t-{record_id[:40]}",
            queue=queue,
            meta=envelope.read_header(data),
            payload_id=None,
            when=now,
        )
        record.put()
        failures.group_entity(record).put()
        failures.kept_payload(record_id, data).put()
    return record_id
