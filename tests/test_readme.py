"""The README's Python examples run as written (against the emulator and the in-memory Datastore).

Each example block starts with a comment naming its file (``# main.py``); the tests find them
by that name. tests/install/test_readme_migration.py follows "Add it to an existing app" end to
end with the installed wheel.
"""

from __future__ import annotations

import re
import sys
import textwrap
import types

import webapp2
import webtest

import gae_deferred
from gae_deferred.webapp2 import deferred_routes
from tests.fixtures import ROOT


def readme_block(first_line: str) -> str:
    """The README's python block whose first line is ``first_line``."""
    text = (ROOT / "README.md").read_text()
    # Blocks inside list items are indented like the item's text.
    blocks = [
        textwrap.dedent(body)
        for _, body in re.findall(r"^( *)```python\n(.*?)^ *```", text, re.S | re.M)
    ]
    found = [block for block in blocks if block.splitlines()[0] == first_line]
    assert len(found) == 1, f"README has {len(found)} python blocks starting {first_line!r}"
    return found[0]


def run_block(first_line: str, **names: object) -> dict:
    namespace = {"__name__": "readme_example", **names}
    exec(compile(readme_block(first_line), "README.md", "exec"), namespace)
    return namespace


def deliver(test_app: webtest.TestApp, task) -> int:
    """Post a queued task to the app as Cloud Tasks would."""
    queue, name = task.name.split("/")[-3], task.name.split("/")[-1]
    request = task.app_engine_http_request
    headers = {"X-AppEngine-QueueName": queue, "X-AppEngine-TaskName": name}
    return test_app.post(request.relative_uri, request.body, headers=headers).status_int


def test_defer_examples_run_as_written(paused, capsys):
    run_block("# reports.py")
    tasks = paused("default") + paused("reports")
    assert len(tasks) == 4
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    assert [deliver(app, task) for task in tasks] == [200] * 4
    output = capsys.readouterr().out
    assert "closures work: 10" in output
    assert "report for gone@example.com month" in output


def test_main_py_mounts_the_routes_behind_the_middleware(paused, monkeypatch):
    """The three lines of "Add it to an existing app", with an app's own handlers module."""

    class Home(webapp2.RequestHandler):
        def get(self) -> None:
            self.response.write("my app")

    monkeypatch.setitem(
        sys.modules, "handlers", types.SimpleNamespace(ROUTES=[webapp2.Route("/", Home)])
    )
    app = webtest.TestApp(run_block("# main.py")["app"])
    assert app.get("/").text == "my app"
    gae_deferred.defer(print, "from the app")
    (task,) = paused()
    assert deliver(app, task) == 200
    # The dashboard is mounted, and refuses a caller that is not an admin.
    assert app.get("/_ah/deferred-admin", expect_errors=True).status_int == 403


def test_signing_key_from_secret_manager(paused, monkeypatch):
    """Secret Manager itself cannot run here: a stand-in answers access_secret_version the way
    the real client does (``.payload.data`` bytes); the rest is the README's code."""
    key = "5e" * 32
    accessed = []

    class SecretManagerServiceClient:
        def access_secret_version(self, name: str) -> object:
            accessed.append(name)
            payload = types.SimpleNamespace(data=key.encode())
            return types.SimpleNamespace(payload=payload)

    secretmanager = types.SimpleNamespace(SecretManagerServiceClient=SecretManagerServiceClient)
    monkeypatch.setitem(sys.modules, "google.cloud.secretmanager", secretmanager)
    monkeypatch.setattr("google.cloud.secretmanager", secretmanager, raising=False)
    monkeypatch.delenv("GAE_DEFERRED_SIGNING_KEY", raising=False)
    gae_deferred.reset_clients()
    run_block("# main.py, on App Engine")
    task = gae_deferred.defer(print, "signed")
    assert gae_deferred.run(task.payload) is None
    assert accessed == ["projects/my-app/secrets/gae-deferred-signing-key/versions/latest"]


def test_testing_example_runs_as_written():
    run_block("# test_digests.py")


def test_configure_example(ndb_stub):
    run_block("# settings.py")
    assert gae_deferred.settings().spill_threshold == 50_000


def test_batch_example_runs_as_written(paused):
    run_block("# digests.py")
    assert len(paused("reports")) == 100
