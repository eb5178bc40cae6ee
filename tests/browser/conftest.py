"""Browser fixtures: the real local stack (both emulators + gunicorn) and a tab of the
session's headless chromium (the ``browser`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

import pytest

from gae_deferred.local.stack import LocalStack
from tests.stack_support import ROOT, pointed_at, started_stack

BROWSER_DIR = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if pathlib.Path(str(item.fspath)).parent == BROWSER_DIR:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The local stack, its app writing task metrics every second (the Metrics page shows a
    run within seconds, not a minute); this process keeps its own interval."""
    with contextlib.ExitStack() as running:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("GAE_DEFERRED_METRICS_FLUSH_SECONDS", "1")  # read by the children only
            local = running.enter_context(
                started_stack(
                    tmp_path_factory.mktemp("browser-stack"),
                    extra_pythonpath=[ROOT],
                    workers=1,
                )
            )
        yield local


@pytest.fixture
def live(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStack]:
    """The stack, with this process's gae_deferred pointed at it (as after `. .local/env`)."""
    with pointed_at(stack, monkeypatch):
        yield stack


@pytest.fixture
def page(browser, live):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    errors: list[str] = []
    # A CSP violation or script error shows up as a console error: the pages must have none.
    tab.on(
        "console",
        lambda message: (
            errors.append(f"{message.text} {message.location.get('url')}")
            if message.type == "error"
            else None
        ),
    )
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert errors == [], errors
