"""Request-to-task tracing: the deferring request's trace goes into the envelope header and the
task's ``traceparent``; the task request becomes the current request; logs carry the trace."""

from __future__ import annotations

import io
import json
import logging

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import envelope, tracing
from gae_deferred.webapp2 import deferred_middleware, deferred_routes
from tests.dashboard.support import sample

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def record_trace(label: str) -> None:
    """A deferred function that defers again, as chained tasks do."""
    gae_deferred.defer(sample, label, _countdown=3600)


class Checkout(webapp2.RequestHandler):
    def post(self) -> None:
        gae_deferred.defer(record_trace, "chained", _countdown=3600)
        self.response.write("ok")


@pytest.mark.parametrize(
    ("headers", "trace_id", "span_id", "sampled"),
    [
        ({"HTTP_TRACEPARENT": f"00-{TRACE}-00f067aa0ba902b7-01"}, TRACE, "00f067aa0ba902b7", True),
        ({"HTTP_X_CLOUD_TRACE_CONTEXT": f"{TRACE}/1;o=1"}, TRACE, "0000000000000001", True),
        (
            {"HTTP_X_CLOUD_TRACE_CONTEXT": f"{TRACE.upper()}/18446744073709551615"},
            TRACE,
            "f" * 16,
            False,
        ),
        (
            {
                "HTTP_TRACEPARENT": f"00-{TRACE}-00f067aa0ba902b7-00",
                "HTTP_X_CLOUD_TRACE_CONTEXT": f"{'a' * 32}/2;o=1",
            },
            TRACE,
            "00f067aa0ba902b7",
            False,
        ),
    ],
)
def test_trace_headers_are_read(headers, trace_id, span_id, sampled):
    trace = tracing.from_environ({"PATH_INFO": "/checkout", **headers})
    assert (trace.path, trace.trace_id, trace.span_id, trace.sampled) == (
        "/checkout",
        trace_id,
        span_id,
        sampled,
    )
    assert trace.traceparent == f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


@pytest.mark.parametrize(
    "value", ["garbage", f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{TRACE}-{'0' * 16}-01"]
)
def test_invalid_trace_headers_start_a_new_trace(value):
    trace = tracing.from_environ({"PATH_INFO": "/x", "HTTP_TRACEPARENT": value})
    assert len(trace.trace_id) == 32 and trace.trace_id not in value


def test_defer_in_a_request_records_it_and_the_task_joins_its_trace(paused):
    app = webtest.TestApp(deferred_middleware(webapp2.WSGIApplication([("/checkout", Checkout)])))
    app.post("/checkout", headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})
    (task,) = paused()
    request = task.app_engine_http_request
    assert request.headers["traceparent"] == f"00-{TRACE}-00f067aa0ba902b7-01"
    header = envelope.read_header(request.body)
    assert header["request"] == {
        "path": "/checkout",
        "trace_id": TRACE,
        "span_id": "00f067aa0ba902b7",
    }
    # The task request, through the middleware, defers again: same trace, its own path.
    tasks_app = webtest.TestApp(deferred_middleware(webapp2.WSGIApplication(deferred_routes())))
    tasks_app.post(
        request.relative_uri,
        request.body,
        headers={
            **dict(request.headers),
            "X-AppEngine-QueueName": "default",
            "X-AppEngine-TaskName": task.name.rsplit("/", 1)[-1],
        },
    )
    chained = [t for t in paused() if t.name != task.name]
    (second,) = chained
    second_header = envelope.read_header(second.app_engine_http_request.body)
    assert second_header["request"]["trace_id"] == TRACE
    assert second_header["request"]["path"] == request.relative_uri
    assert second.app_engine_http_request.headers["traceparent"].startswith(f"00-{TRACE}-")


def test_defer_outside_a_request_records_nothing(paused):
    gae_deferred.defer(sample, 1, _countdown=3600)
    (task,) = paused()
    assert "traceparent" not in task.app_engine_http_request.headers
    assert "request" not in envelope.read_header(task.app_engine_http_request.body)


def test_app_engine_logs_are_structured_with_the_trace(monkeypatch):
    monkeypatch.setenv("GAE_ENV", "standard")
    handler = tracing.configure_logging()
    stream = io.StringIO()
    handler.stream = stream
    try:
        trace = tracing.from_environ(
            {"PATH_INFO": "/t", "HTTP_TRACEPARENT": f"00-{TRACE}-00f067aa0ba902b7-01"}
        )
        with tracing.request_scope(trace):
            logging.getLogger("gae_deferred").warning("inside the task")
        logging.getLogger("gae_deferred").warning("outside")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    # The handler also writes its own instrumentation lines, which have no message.
    inside, outside = [line for line in lines if "message" in line]
    assert inside["message"] == "inside the task"
    assert inside["logging.googleapis.com/trace"] == f"projects/test-project/traces/{TRACE}"
    assert inside["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert inside["logging.googleapis.com/trace_sampled"] is True
    assert outside["logging.googleapis.com/trace"] == ""


def test_local_logs_are_plain_lines():
    handler = tracing.configure_logging()
    stream = io.StringIO()
    handler.stream = stream
    try:
        with tracing.request_scope(tracing.from_environ({"PATH_INFO": "/x"})) as trace:
            logging.getLogger("gae_deferred").warning("readable")
    finally:
        logging.getLogger().removeHandler(handler)
    line = stream.getvalue().strip()
    assert line.endswith(f"WARNING gae_deferred [trace {trace.trace_id[:8]}]: readable")
    assert not line.startswith("{")
