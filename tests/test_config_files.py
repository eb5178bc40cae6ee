"""app.yaml, cron.yaml, queue.yaml and index.yaml agree with the code that reads them."""

from __future__ import annotations

import sys

import webapp2
import webtest
import yaml

from gae_deferred.local.datastore.server import load_index_yaml
from gae_deferred.queue_config import load_queue_yaml
from gae_deferred.webapp2 import deferred_routes
from tests.conftest import ROOT


def test_app_yaml_targets_the_python_ci_tests_and_our_entrypoint():
    app = yaml.safe_load((ROOT / "app.yaml").read_text())
    assert app["runtime"] == f"python{sys.version_info.major}{sys.version_info.minor}"
    assert "gunicorn" in app["entrypoint"] and "main:app" in app["entrypoint"]
    static = [h for h in app["handlers"] if "static_dir" in h]
    assert static and all((ROOT / h["static_dir"]).is_dir() for h in static)
    admin_only = {h["url"] for h in app["handlers"] if h.get("login") == "admin"}
    assert {"/_ah/queue/deferred.*", "/_ah/deferred-admin.*"} <= admin_only


def test_cron_yaml_urls_are_routed(ndb_stub):
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    for job in yaml.safe_load((ROOT / "cron.yaml").read_text())["cron"]:
        # Not from App Engine cron nor an admin here: refused, but routed (not a 404).
        assert app.get(job["url"], expect_errors=True).status_int == 403


def test_queue_yaml_and_index_yaml_load():
    queues = load_queue_yaml(ROOT / "queue.yaml")
    assert {"default", "reports"} <= set(queues)
    assert queues["reports"].retry.task_retry_limit == 3
    kinds = {index.kind for index in load_index_yaml(ROOT / "index.yaml")}
    assert {"_DeferredPayload", "_DeferredFailure"} <= kinds
