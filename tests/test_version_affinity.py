"""Tasks follow their version: on App Engine a task goes back to the version that made it.

The legacy task queue sent a task to the enqueuing request's Host (version.service); defer()
sets Cloud Tasks' App Engine routing to GAE_VERSION and GAE_SERVICE instead, unless the call
routes the task itself or affinity is turned off. Through the real CloudTasksClient against the
Cloud Tasks emulator (queues paused, so the tasks stay put).
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest
import webapp2
import webtest
from google.cloud import ndb

import gae_deferred
from gae_deferred import (
    ConfigurationError,
    FailureState,
    batch,
    defer,
    failures,
    spillover,
)
from gae_deferred.webapp2 import deferred_routes
from tests.callables import add

RAN: list = []


def remember(value):
    RAN.append((value, gae_deferred.settings().running_version))


def routing_of(task) -> tuple[str, str, str]:
    routing = task.app_engine_http_request.app_engine_routing
    return routing.service, routing.version, routing.instance


def reread_environment() -> None:
    """Settings from the environment again, on the same in-memory Datastore."""
    client = gae_deferred.settings().ndb_client
    gae_deferred.reset_clients()
    gae_deferred.configure(ndb_client=client)


@pytest.fixture
def on_app_engine(monkeypatch):
    """This process runs as version v1 of service worker, as App Engine tells it."""
    monkeypatch.setenv("GAE_VERSION", "v1")
    monkeypatch.setenv("GAE_SERVICE", "worker")
    gae_deferred.reset_clients()


def test_a_task_goes_back_to_the_version_and_service_that_made_it(on_app_engine, paused):
    defer(add, 1, _name="inline")
    defer(add, b"x" * 200_000, _name="spilled")
    with batch() as many:
        many.defer(add, 2, _name="batched")
    tasks = {task.name.rsplit("/", 1)[-1]: task for task in paused()}
    assert sorted(tasks) == ["batched", "inline", "spilled"]
    assert {name: routing_of(task) for name, task in tasks.items()} == {
        "batched": ("worker", "v1", ""),
        "inline": ("worker", "v1", ""),
        "spilled": ("worker", "v1", ""),
    }


def test_the_sweeper_recreates_a_lost_task_on_the_version_that_made_it(
    on_app_engine, paused, monkeypatch
):
    """A transactional defer whose CreateTask never happened: the sweeper, running on another
    version, creates the task on the version that made it."""
    host = os.environ["CLOUD_TASKS_EMULATOR_HOST"]
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:9")
    gae_deferred.cloud_tasks.reset_client()
    ndb.transaction(lambda: defer(add, 1, _transactional=True))
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", host)
    gae_deferred.cloud_tasks.reset_client()
    assert paused() == []
    gae_deferred.configure(running_version="v2")
    grace = gae_deferred.settings().sweep_grace_seconds + 1
    report = gae_deferred.sweep(now=spillover.now() + datetime.timedelta(seconds=grace))
    assert report.reenqueued == 1
    (task,) = paused()
    assert routing_of(task) == ("worker", "v1", "")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"_target": "v7.batch"}, ("batch", "v7", "")),
        ({"_target": "batch"}, ("batch", "", "")),
        ({"_service": "api"}, ("api", "", "")),
        ({"_version": "v9"}, ("", "v9", "")),
        ({"_version": "v9", "_instance": "2"}, ("", "v9", "2")),
    ],
)
def test_a_call_that_routes_its_task_keeps_its_own_routing(
    on_app_engine, paused, options, expected
):
    defer(add, 1, **options)
    (task,) = paused()
    assert routing_of(task) == expected


def test_configure_turns_affinity_off(on_app_engine, paused):
    gae_deferred.configure(version_affinity=False)
    defer(add, 1)
    (task,) = paused()
    assert routing_of(task) == ("", "", "")


def test_the_environment_turns_affinity_off(on_app_engine, paused, monkeypatch):
    monkeypatch.setenv("GAE_DEFERRED_VERSION_AFFINITY", "0")
    reread_environment()
    defer(add, 1)
    (task,) = paused()
    assert routing_of(task) == ("", "", "")


def test_a_bad_affinity_setting_is_refused(monkeypatch):
    monkeypatch.setenv("GAE_DEFERRED_VERSION_AFFINITY", "off")
    gae_deferred.reset_clients()
    with pytest.raises(ConfigurationError, match="GAE_DEFERRED_VERSION_AFFINITY must be 1 or 0"):
        gae_deferred.settings()


def test_off_app_engine_tasks_take_the_default_routing(paused):
    assert gae_deferred.settings().running_version is None
    defer(add, 1)
    (task,) = paused()
    assert routing_of(task) == ("", "", "")


def test_a_task_of_a_deleted_version_runs_on_the_default_version(
    on_app_engine, paused, monkeypatch
):
    """Cloud Tasks delivers a task whose version no longer exists to the default version: the
    envelope is bound to its task, not to a version, so the handler there runs it."""
    RAN.clear()
    defer(remember, "inline", _name="from-v1")
    defer(remember, "z" * 200_000, _name="spilled-from-v1")
    made = {task.name.rsplit("/", 1)[-1]: task for task in paused()}
    assert {routing_of(task)[1] for task in made.values()} == {"v1"}
    # v1 is deleted; the default version, v2, gets its tasks.
    monkeypatch.setenv("GAE_VERSION", "v2")
    reread_environment()
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    for name, task in sorted(made.items()):
        request = task.app_engine_http_request
        answer = app.post(
            request.relative_uri,
            bytes(request.body),
            headers={"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": name},
        )
        assert answer.status_int == 200, answer.text
    assert sorted((value[:6], version) for value, version in RAN) == [
        ("inline", "v2"),
        ("zzzzzz", "v2"),
    ]


def test_a_payload_that_does_not_load_on_the_default_version_is_kept_for_its_own(
    on_app_engine, paused, monkeypatch, tmp_path
):
    """A payload v1 made that v2 cannot load (v1's code only) fails as version skew, naming
    both, and is kept: the dashboard retries it on v1, the version that made it."""
    module = tmp_path / "only_in_v1.py"
    module.write_text("def work(value):\n    return value\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_in_v1

    defer(only_in_v1.work, 1, _name="skewed")
    (task,) = paused()
    del sys.modules["only_in_v1"]
    sys.path.remove(str(tmp_path))
    monkeypatch.setenv("GAE_VERSION", "v2")
    reread_environment()
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    answer = app.post(
        task.app_engine_http_request.relative_uri,
        bytes(task.app_engine_http_request.body),
        headers={"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "skewed"},
    )
    assert answer.status_int == 200
    record = failures.get(failures.failure_id("default", "skewed"))
    assert record.state == FailureState.DEAD
    assert record.exception_type == "gae_deferred.errors.VersionSkewError"
    assert "app version v1" in record.message and "app version v2" in record.message
    assert "retry it on app version v1" in record.message

    from gae_deferred import admin

    name = admin.retrigger_failure(record.key.id(), "admin@example.com", version="v1")
    (retried,) = [t for t in paused() if t.name.endswith(name)]
    assert routing_of(retried)[1] == "v1"
