"""The rest of ``google.appengine.ext.deferred``: ``Handler``, ``application``,
``run_from_datastore`` and ``invoke_member``, framework-free.

    import gae_deferred as deferred

    deferred.invoke_member(report, "build", period="week")     # report.build(period="week")
    deferred.run_from_datastore(task.payload_id)                # run a spilled payload now

``application`` is a WSGI app that runs tasks on whatever path it is mounted at, as the legacy
one did; ``Handler`` is its class, with the legacy Python 3 API that Flask apps call from their
own routes::

    @app.route("/custom/path", methods=["POST"])
    def custom_deferred():
        return deferred.Handler().post(request.environ)

The webapp2 ``TaskHandler`` (``deferred.TaskHandler``) lives in gae_deferred.webapp2.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from google.cloud import ndb

from . import envelope, http_target, spillover
from ._datastore import ndb_context
from .context import TaskInfo
from .errors import PermanentTaskFailure, SingularTaskFailure, SpilledPayloadMissing, TaskFailed
from .execution import OK, RETRY_QUIETLY, TaskOutcome, execute_task

logger = logging.getLogger("gae_deferred")

#: Cloud Tasks caps App Engine tasks at 100 KB (HTTP targets at 1 MB); anything bigger is forged.
MAX_BODY_BYTES = 1024 * 1024
TEXT_PLAIN = ("Content-Type", "text/plain; charset=utf-8")

Response = tuple[str, http.HTTPStatus, list[tuple[str, str]]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def invoke_member(obj: Any, membername: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``obj.<membername>(*args, **kwargs)``, as legacy deferred did for bound methods.

    ``defer(invoke_member, report, "build", 3)`` runs ``report.build(3)`` in the task; cloudpickle
    also defers ``report.build`` directly, so new code needs no helper.
    """
    if not isinstance(membername, str):
        raise TypeError(f"membername must be the name of a member, not {membername!r}")
    return getattr(obj, membername)(*args, **kwargs)


def run_from_datastore(key: str | ndb.Key) -> Any:
    """Run a spilled payload now, in this process, and delete it; returns the call's result.

    ``key`` is the payload id (``DeferredTask.payload_id``) or its ``ndb.Key``. As in legacy
    deferred, the record goes after success and after ``PermanentTaskFailure``, and stays when
    the call raises anything else; a missing record raises ``SpilledPayloadMissing`` (a
    ``PermanentTaskFailure``). A task still queued for the payload will then find it gone and
    record a permanent failure, so this is for payloads whose task is not going to run::

        deferred.run_from_datastore(failure.payload_id)     # from a shell, after a fix
    """
    payload_id = _payload_id(key)
    with ndb_context():
        record = spillover.get(payload_id)
        if record is None:
            raise SpilledPayloadMissing(f"spilled payload {payload_id} is not in Datastore")
        _, data = spillover.load(payload_id, record.chunks, record.stored_bytes)
        obj, args, kwargs = envelope.load_call(envelope.open_envelope(data))
        try:
            result = obj(*args, **kwargs)
        except PermanentTaskFailure:
            spillover.delete(payload_id, record.chunks)
            raise
        spillover.delete(payload_id, record.chunks)
    return result


def _payload_id(key: str | ndb.Key) -> str:
    if isinstance(key, ndb.Key):
        if key.kind() != spillover.DeferredPayload._get_kind() or not isinstance(key.id(), str):
            raise ValueError(f"{key!r} is not the key of a spilled payload")
        return key.id()
    if not isinstance(key, str) or not key:
        raise TypeError(f"run_from_datastore needs a payload id or its ndb.Key, not {key!r}")
    return key


def execute_request(environ: Mapping[str, Any], read_body: Callable[[], bytes]) -> TaskOutcome:
    """Run the task a request carries and say what to answer; the body is read only if it
    comes from the task queue and is not larger than any task can be."""
    try:
        task = TaskInfo.from_environ(environ)
    except http_target.Unproven as exc:
        return http_target.outcome_for(exc)
    length = _content_length(environ)
    if task is not None and length is not None and length > MAX_BODY_BYTES:
        return TaskOutcome(413, "too large", f"body of {length} bytes is larger than any task")
    return execute_task(read_body(), task)


def raise_for_failure(outcome: TaskOutcome) -> None:
    """Raise what legacy ``run_from_request()`` let escape, for a task that failed.

    The failure is already logged and recorded; the exception tells the caller (the legacy
    ``post()``, or an app's override) what happened: SingularTaskFailure (retry quietly),
    PermanentTaskFailure (never retried), or TaskFailed (the function raised; retried).
    """
    if outcome.status == RETRY_QUIETLY:
        raise SingularTaskFailure(outcome.message)
    if outcome.status == OK and outcome.result != "ok":
        raise PermanentTaskFailure(outcome.message)
    if outcome.status >= 500:
        raise TaskFailed(outcome.message, result=outcome.result)


def answer_for(exc: PermanentTaskFailure | SingularTaskFailure | TaskFailed) -> tuple[int, str]:
    """The status and text the legacy ``post()`` answers for what ``run_from_request()`` raised."""
    if isinstance(exc, SingularTaskFailure):
        return RETRY_QUIETLY, "retry"
    if isinstance(exc, TaskFailed):
        return 500, exc.result
    return OK, "permanent"


def _content_length(environ: Mapping[str, Any]) -> int | None:
    try:
        return int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None


def _read_body(environ: Mapping[str, Any]) -> bytes:
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    length = _content_length(environ)
    return stream.read(length) if length is not None else stream.read(MAX_BODY_BYTES + 1)


class Handler:
    """The legacy Python 3 ``deferred.Handler``: a WSGI app that runs deferred tasks.

    ``post(environ)`` returns ``(body, HTTPStatus, headers)``, which Flask accepts as a response;
    ``run_from_request(environ)`` runs the task and raises what legacy raised (see
    :func:`raise_for_failure`). Subclass it to add work around a task, as legacy apps did::

        class CustomDeferredHandler(deferred.Handler):
            def post(self, environ):
                print("Executing deferred task.")
                return super().post(environ)

    Requests are checked as by the webapp2 handler: task queue headers and a signed body, or 403.
    """

    def run_from_request(self, environ: Mapping[str, Any]) -> Response:
        """Run the task of a WSGI request; return the response, or raise if the task failed."""
        outcome = execute_request(environ, lambda: _read_body(environ))
        raise_for_failure(outcome)
        return outcome.result, http.HTTPStatus(outcome.status), [TEXT_PLAIN]

    def post(self, environ: Mapping[str, Any]) -> Response:
        """Run the task and answer what Cloud Tasks should do next: 200 done, 408 or 500 retry."""
        try:
            return self.run_from_request(environ)
        except (PermanentTaskFailure, SingularTaskFailure, TaskFailed) as exc:
            status, text = answer_for(exc)
            return text, http.HTTPStatus(status), [TEXT_PLAIN]

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            start_response("405 Method Not Allowed", [("Allow", "POST"), TEXT_PLAIN])
            return [b"deferred tasks are POSTed\n"]
        text, status, headers = self.post(environ)
        start_response(f"{status.value} {status.phrase}", headers)
        return [text.encode() + b"\n"]


#: The legacy module-level WSGI app: mount it at /_ah/queue/deferred (and below).
application = Handler()
