"""The README's Python examples run as written (against the emulator and the stub)."""

from __future__ import annotations

import re

import webapp2
import webtest
from google.cloud import tasks_v2

import gae_deferred
from gae_deferred.cloud_tasks import client as tasks_client
from gae_deferred.cloud_tasks import queue_path
from gae_deferred.webapp2 import deferred_routes
from tests.conftest import ROOT


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_defer_examples_run_as_written(paused, capsys):
    mount, examples, configure = python_blocks()
    assert "deferred_routes()" in mount
    namespace = {"__name__": "readme_example"}
    exec(compile(examples, "README.md", "exec"), namespace)

    tasks = [
        task
        for queue in ("default", "reports")
        for task in tasks_client().list_tasks(
            request={"parent": queue_path(queue), "response_view": tasks_v2.Task.View.FULL}
        )
    ]
    assert len(tasks) == 4
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    for task in tasks:
        queue = task.name.split("/")[-3]
        headers = {"X-AppEngine-QueueName": queue, "X-AppEngine-TaskName": task.name.split("/")[-1]}
        request = task.app_engine_http_request
        assert app.post(request.relative_uri, request.body, headers=headers).status_int == 200
    output = capsys.readouterr().out
    assert "closures work: 10" in output
    assert "report for gone@example.com month" in output

    exec(compile(configure, "README.md", "exec"), {})
    assert gae_deferred.settings().spill_threshold == 50_000
