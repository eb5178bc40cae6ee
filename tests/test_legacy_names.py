"""The names legacy apps import from ``google.appengine.ext.deferred``, on gae_deferred.

``import gae_deferred as deferred`` must give them all: TaskHandler (webapp2, subclassable the
legacy way), Handler and application (WSGI), run_from_datastore, invoke_member.
"""

from __future__ import annotations

import http
import io
import os
import subprocess
import sys

import pytest
import webapp2
import webtest

import gae_deferred as deferred
from gae_deferred import spillover
from gae_deferred.testing import capture_tasks
from tests.callables import add

TASK = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "task-1"}
TASK_ENVIRON = {"HTTP_X_APPENGINE_QUEUENAME": "default", "HTTP_X_APPENGINE_TASKNAME": "task-1"}
CALLS: list = []


def record(*args):
    CALLS.append(args)
    return len(CALLS)


def fail_with(exc, *padding):
    raise exc


class Greeter:
    def __init__(self, greeting):
        self.greeting = greeting

    def greet(self, name, punctuation="."):
        return f"{self.greeting}, {name}{punctuation}"


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


# --- import gae_deferred stays framework-free ---------------------------------------------


def _modules_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter has loaded after running ``code``."""
    script = f"{code}\nimport sys\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_core_names_do_not_import_webapp2_or_jinja2():
    loaded = _modules_after(
        "import gae_deferred as d\n"
        "d.defer, d.application, d.Handler, d.run_from_datastore, d.invoke_member, d.run\n"
        "from gae_deferred import *"
    )
    assert "gae_deferred" in loaded and "google" in loaded
    assert not {"webapp2", "jinja2", "webob"} & loaded


def test_task_handler_brings_in_webapp2_only_when_asked_for():
    loaded = _modules_after("import gae_deferred as d\nd.TaskHandler")
    assert "webapp2" in loaded


def test_every_exported_name_resolves():
    for name in [*deferred.__all__, "TaskHandler"]:
        assert getattr(deferred, name) is not None, name
    assert "TaskHandler" in dir(deferred) and "defer" in dir(deferred)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        deferred.no_such_name  # noqa: B018 - the attribute access is the test


def test_legacy_exceptions_keep_their_names():
    assert issubclass(deferred.PermanentTaskFailure, deferred.Error)
    assert issubclass(deferred.SingularTaskFailure, deferred.Error)
    assert deferred.TaskHandler is deferred.webapp2.TaskHandler


# --- invoke_member ------------------------------------------------------------------------


def test_invoke_member_calls_the_named_member():
    greeter = Greeter("Hello")
    assert deferred.invoke_member(greeter, "greet", "Ada", punctuation="!") == "Hello, Ada!"


def test_invoke_member_runs_deferred(ndb_stub):
    with capture_tasks() as queue:
        deferred.defer(deferred.invoke_member, Greeter("Hi"), "greet", "Bob")
        [task] = queue.tasks
        assert task.function == "gae_deferred.legacy.invoke_member"
        assert deferred.run(task.payload) == "Hi, Bob."


def test_invoke_member_refuses_a_non_string_name():
    with pytest.raises(TypeError, match="name of a member"):
        deferred.invoke_member(Greeter("Hi"), Greeter.greet)


def test_invoke_member_missing_member_raises_attribute_error():
    with pytest.raises(AttributeError, match="shout"):
        deferred.invoke_member(Greeter("Hi"), "shout")


# --- run_from_datastore -------------------------------------------------------------------


def _spilled(queue, *args):
    # Random bytes: a repetitive argument compresses and would not spill.
    task = deferred.defer(record, *args, os.urandom(300_000))
    assert task.spilled
    queue.clear()
    return task


def test_run_from_datastore_runs_and_deletes_the_spilled_payload(ndb_stub):
    with capture_tasks() as queue:
        task = _spilled(queue, "big")
        assert deferred.run_from_datastore(task.payload_id) == 1
        assert CALLS[0][0] == "big" and len(CALLS[0][1]) == 300_000
        assert spillover.get(task.payload_id) is None


def test_run_from_datastore_accepts_the_record_key(ndb_stub):
    with capture_tasks() as queue:
        task = _spilled(queue, "by key")
        deferred.run_from_datastore(spillover.payload_key(task.payload_id))
        assert CALLS[0][0] == "by key"


def test_run_from_datastore_keeps_the_payload_when_the_call_raises(ndb_stub):
    with capture_tasks() as queue:
        task = deferred.defer(fail_with, ValueError("transient"), os.urandom(300_000))
        queue.clear()
        with pytest.raises(ValueError, match="transient"):
            deferred.run_from_datastore(task.payload_id)
        assert spillover.get(task.payload_id) is not None


def test_run_from_datastore_deletes_after_permanent_failure(ndb_stub):
    with capture_tasks() as queue:
        task = deferred.defer(fail_with, deferred.PermanentTaskFailure("no"), os.urandom(300_000))
        queue.clear()
        with pytest.raises(deferred.PermanentTaskFailure, match="no"):
            deferred.run_from_datastore(task.payload_id)
        assert spillover.get(task.payload_id) is None


def test_run_from_datastore_missing_payload_is_permanent(ndb_stub):
    with pytest.raises(deferred.SpilledPayloadMissing, match="0123abc"):
        deferred.run_from_datastore("0123abc")


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        (None, TypeError, "payload id or its ndb.Key"),
        ("", TypeError, "payload id or its ndb.Key"),
        (42, TypeError, "payload id or its ndb.Key"),
    ],
)
def test_run_from_datastore_refuses_what_is_not_a_payload_key(ndb_stub, key, error, message):
    with pytest.raises(error, match=message):
        deferred.run_from_datastore(key)


def test_run_from_datastore_refuses_another_kind_of_key(ndb_stub):
    from google.cloud import ndb

    with pytest.raises(ValueError, match="not the key of a spilled payload"):
        deferred.run_from_datastore(ndb.Key("Account", "abc"))


# --- Handler and application (WSGI, the legacy Python 3 API) ------------------------------


def environ_for(body: bytes, **extra) -> dict:
    return {
        "REQUEST_METHOD": "POST",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        **TASK_ENVIRON,
        **extra,
    }


def test_handler_post_returns_a_flask_style_response(ndb_stub):
    body, status, headers = deferred.Handler().post(environ_for(deferred.serialize(record, 1)))
    assert (body, status) == ("ok", http.HTTPStatus.OK)
    assert ("Content-Type", "text/plain; charset=utf-8") in headers
    assert CALLS == [(1,)]


@pytest.mark.parametrize(
    ("exc", "status", "text"),
    [
        (deferred.SingularTaskFailure(), 408, "retry"),
        (deferred.PermanentTaskFailure("gone"), 200, "permanent"),
        (RuntimeError("boom"), 500, "retrying"),
    ],
)
def test_handler_post_answers_failures_as_the_task_handler_does(ndb_stub, exc, status, text):
    response = deferred.Handler().post(environ_for(deferred.serialize(fail_with, exc)))
    assert response[:2] == (text, status)


def test_handler_run_from_request_raises_what_legacy_raised(ndb_stub):
    handler = deferred.Handler()
    with pytest.raises(deferred.SingularTaskFailure):
        handler.run_from_request(
            environ_for(deferred.serialize(fail_with, deferred.SingularTaskFailure()))
        )
    with pytest.raises(deferred.PermanentTaskFailure, match="gone"):
        handler.run_from_request(
            environ_for(deferred.serialize(fail_with, deferred.PermanentTaskFailure("gone")))
        )
    with pytest.raises(deferred.TaskFailed, match="RuntimeError: boom") as raised:
        handler.run_from_request(environ_for(deferred.serialize(fail_with, RuntimeError("boom"))))
    assert raised.value.result == "retrying"


def test_handler_refuses_requests_without_task_headers(ndb_stub):
    environ = environ_for(deferred.serialize(record, 1))
    del environ["HTTP_X_APPENGINE_TASKNAME"]
    assert deferred.Handler().post(environ)[:2] == ("forbidden", 403)
    assert CALLS == []


def test_handler_refuses_an_unsigned_legacy_pickle(ndb_stub):
    import pickle

    body = pickle.dumps((record, (1,), {}))
    assert deferred.Handler().post(environ_for(body))[:2] == ("forbidden", 403)
    assert CALLS == []


def test_handler_refuses_a_body_larger_than_any_task(ndb_stub):
    environ = environ_for(b"", CONTENT_LENGTH=str(2 * 1024 * 1024))
    assert deferred.Handler().post(environ)[:2] == ("too large", 413)


def test_handler_subclass_adds_work_around_the_task(ndb_stub):
    seen = []

    class CustomDeferredHandler(deferred.Handler):
        def post(self, environ):
            seen.append("before")
            return super().post(environ)

    app = webtest.TestApp(CustomDeferredHandler())
    app.post("/custom/path", deferred.serialize(record, "custom"), headers=TASK)
    assert seen == ["before"] and CALLS == [("custom",)]


def test_application_is_a_wsgi_app_on_any_path(ndb_stub):
    app = webtest.TestApp(deferred.application)
    response = app.post("/_ah/queue/deferred/x.y", deferred.serialize(add, 2, b=3), headers=TASK)
    assert response.status_int == 200 and response.text == "ok\n"
    assert app.post("/", deferred.serialize(fail_with, ValueError()), headers=TASK, status=500)
    assert app.get("/_ah/queue/deferred", status=405).headers["Allow"] == "POST"


# --- TaskHandler (webapp2), subclassed the legacy way -------------------------------------


def webapp(handler_class):
    routes = [(r"/_ah/queue/deferred(?:/.*)?", handler_class)]
    return webtest.TestApp(webapp2.WSGIApplication(routes))


def test_task_handler_runs_tasks_on_suffixed_urls(ndb_stub):
    app = webapp(deferred.TaskHandler)
    response = app.post("/_ah/queue/deferred/tests.x", deferred.serialize(record, 7), headers=TASK)
    assert response.status_int == 200 and CALLS == [(7,)]
    assert app.post("/_ah/queue/deferred", deferred.serialize(record, 8), status=403)


def test_task_handler_answers_like_legacy(ndb_stub):
    app = webapp(deferred.TaskHandler)
    for exc, status in (
        (deferred.SingularTaskFailure(), 408),
        (deferred.PermanentTaskFailure("gone"), 200),
        (KeyError("k"), 500),
    ):
        body = deferred.serialize(fail_with, exc)
        assert app.post("/_ah/queue/deferred", body, headers=TASK, status="*").status_int == status


def test_run_from_request_override_wraps_every_task(ndb_stub):
    class AuditedTaskHandler(deferred.TaskHandler):
        def run_from_request(self):
            CALLS.append(("start", self.request.headers["X-AppEngine-TaskName"]))
            super().run_from_request()
            CALLS.append(("end",))

    webapp(AuditedTaskHandler).post("/_ah/queue/deferred", deferred.serialize(record, 1), TASK)
    assert CALLS == [("start", "task-1"), (1,), ("end",)]


def test_post_override_sees_the_task_exception_and_decides_the_answer(ndb_stub):
    # The shape of real subclasses: catch what run_from_request raised, log, answer 200 so
    # Cloud Tasks stops retrying (e.g. to move the task to a queue of broken tasks).
    class LimitedTaskHandler(deferred.TaskHandler):
        def post(self):
            try:
                self.run_from_request()
            except deferred.SingularTaskFailure:
                self.response.set_status(408)
            except deferred.PermanentTaskFailure:
                CALLS.append("permanent")
            except Exception as exception:
                CALLS.append(("gave up", str(exception)))

    app = webapp(LimitedTaskHandler)
    body = deferred.serialize(fail_with, ValueError("bad row"))
    assert app.post("/_ah/queue/deferred", body, headers=TASK).status_int == 200
    assert CALLS == [("gave up", "ValueError: bad row")]
    body = deferred.serialize(fail_with, deferred.SingularTaskFailure())
    assert app.post("/_ah/queue/deferred", body, headers=TASK, status=408)


def test_run_from_request_override_can_refuse_a_task(ndb_stub):
    class PausedTaskHandler(deferred.TaskHandler):
        def run_from_request(self):
            raise deferred.SingularTaskFailure("maintenance: try later")

    app = webapp(PausedTaskHandler)
    response = app.post("/_ah/queue/deferred", deferred.serialize(record, 1), TASK, status=408)
    assert response.text == "retry\n" and CALLS == []
