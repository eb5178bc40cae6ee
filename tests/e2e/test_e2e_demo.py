"""The demo page at / on the real app: every button defers its task; CSRF is enforced."""

from __future__ import annotations

import datetime
import re

import pytest
import requests
from e2e_helpers import failure_state

import demo
from demo import tasks as demo_tasks
from gae_deferred.local.stack import LocalStack
from tests.stack_support import datastore, queued_tasks, wait_for

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
FLASH_TASK = re.compile(r'<code id="flash-task">([^<]+)</code>')

# Real processes: both emulators and gunicorn (the session stack in conftest.py).
pytestmark = pytest.mark.e2e


@pytest.fixture
def session(e2e: LocalStack) -> requests.Session:
    browser = requests.Session()
    page = browser.get(e2e.app_url + "/", timeout=10)
    assert page.status_code == 200
    assert "local mode" in page.text and 'href="/_ah/deferred-admin"' in page.text
    return browser


def _token(page: str) -> str:
    match = TOKEN.search(page)
    assert match, "no csrf_token in the demo page"
    return match.group(1)


def _press(e2e: LocalStack, browser: requests.Session, kind: str) -> str:
    """Submit one button's form like a browser; returns the task name the flash shows."""
    token = _token(browser.get(e2e.app_url + "/", timeout=10).text)
    answer = browser.post(
        f"{e2e.app_url}/demo/{kind}",
        data={"csrf_token": token, "kind": kind},
        timeout=60,
        allow_redirects=False,
    )
    assert answer.status_code in (302, 303), answer.text
    assert answer.headers["Location"].endswith("/")
    page = browser.get(e2e.app_url + "/", timeout=10).text
    match = FLASH_TASK.search(page)
    assert match, f"no flash after pressing {kind}"
    # The flash shows once.
    assert not FLASH_TASK.search(browser.get(e2e.app_url + "/", timeout=10).text)
    return match.group(1)


def _outcomes(task_name: str) -> list[str]:
    with datastore():
        runs = demo_tasks.DemoRun.query(demo_tasks.DemoRun.task_name == task_name).fetch()
    return sorted(run.outcome for run in runs)


def test_every_button_defers_its_task(e2e: LocalStack, session: requests.Session) -> None:
    names = {kind: _press(e2e, session, kind) for kind in demo.KINDS}

    for kind in ("quick", "closure", "spill", "chunked"):
        wait_for(lambda k=kind: _outcomes(names[k]) == ["ok"], f"the {kind} demo task to run")
    wait_for(lambda: failure_state("default", names["flaky"]) == "resolved", "flaky task resolved")
    assert _outcomes(names["flaky"]) == ["failed", "failed", "ok"]
    wait_for(
        lambda: failure_state("default", names["permanent"]) == "permanent", "permanent failure"
    )
    wait_for(lambda: failure_state("default", names["always-fails"]), "always-fails recorded")
    [countdown] = [t for t in queued_tasks("default") if t.name.endswith(names["countdown"])]
    wait = countdown.schedule_time - datetime.datetime.now(datetime.UTC)
    assert wait > datetime.timedelta(seconds=demo.COUNTDOWN_SECONDS - 15)
    page = session.get(e2e.app_url + "/", timeout=10).text
    assert names["quick"] in page, "the latest runs table lists the quick task"


def test_post_without_the_csrf_token_is_refused(e2e: LocalStack, session: requests.Session) -> None:
    url = e2e.app_url + "/demo/quick"

    missing = session.post(url, data={}, timeout=10, allow_redirects=False)
    wrong = session.post(url, data={"csrf_token": "x" * 43}, timeout=10, allow_redirects=False)
    no_cookie = requests.post(
        url,
        data={"csrf_token": _token(session.get(e2e.app_url + "/", timeout=10).text)},
        timeout=10,
        allow_redirects=False,
    )

    assert [missing.status_code, wrong.status_code, no_cookie.status_code] == [403, 403, 403]


def test_unknown_demo_is_a_clear_404(e2e: LocalStack, session: requests.Session) -> None:
    token = _token(session.get(e2e.app_url + "/", timeout=10).text)

    answer = session.post(
        e2e.app_url + "/demo/nope", data={"csrf_token": token}, timeout=10, allow_redirects=False
    )

    assert answer.status_code == 404
    assert "no demo task 'nope'" in answer.text
