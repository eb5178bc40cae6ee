"""deferred_routes() mounts into an existing app without touching its own routes."""

from __future__ import annotations

import webapp2
import webtest
from google.cloud import tasks_v2

from gae_deferred.cloud_tasks import client as tasks_client, queue_path
from gae_deferred.webapp2 import deferred_routes
from tests.mounted_app import app_handlers


def test_mounted_app_keeps_its_routes_and_runs_deferred_tasks(paused):
    app = webtest.TestApp(webapp2.WSGIApplication(app_handlers.ROUTES + deferred_routes()))
    assert app.get("/").text == "my app"
    assert app.post("/signup", {"email": "a@example.com"}).text == "welcome queued"

    (task,) = tasks_client().list_tasks(
        request={"parent": queue_path("reports"), "response_view": tasks_v2.Task.View.FULL}
    )
    request = task.app_engine_http_request
    assert request.relative_uri.endswith("app_handlers.send_welcome")
    headers = {"X-AppEngine-QueueName": "reports", "X-AppEngine-TaskName": task.name.split("/")[-1]}
    app_handlers.SENT.clear()
    assert app.post(request.relative_uri, request.body, headers=headers).status_int == 200
    assert app_handlers.SENT == ["a@example.com"]
    assert app.get("/nowhere", status=404)
