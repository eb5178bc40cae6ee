"""Draining a python27 queue: the legacy library's unsigned pickles, run for a while, on purpose.

The python27 ``deferred`` library put a bare pickle of ``(callable, args, kwargs)`` in each task
(protocol 2), or, for a big one, a pickle of ``(run_from_datastore, (key,), {})`` whose
``_DeferredTaskEntity`` holds that pickle. The same queues serve both libraries during a
cut-over, so such tasks reach this handler. They run only while the app says so::

    gae_deferred.configure(legacy_pickles_until="2027-01-31")   # GAE_DEFERRED_LEGACY_PICKLES_UNTIL

and only for a request with App Engine's own task headers on App Engine (``GAE_ENV`` set; App
Engine strips ``X-AppEngine-*`` from outside requests, which is all the legacy handler trusted).
Off by default and refused after that day (UTC): a refusal is a 403, counted and shown on the
dashboard (:mod:`gae_deferred.refusals`). Each run is counted and logged; a failure is recorded
like any task's, with the call re-sealed as a signed envelope so the dashboard can retry it.

Python 2 ``str`` is text or bytes: one that is valid UTF-8 loads as ``str``, any other as
``bytes`` (a digest, an image); ``unicode`` loads as ``str``, and datetimes keep their value.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import pickle
import time
from typing import Any

from google.cloud import ndb

from . import envelope, execution, failures, metrics, refusals
from ._config import settings
from ._datastore import ndb_context
from .context import TaskInfo, running
from .errors import PayloadLoadError, PermanentTaskFailure, SingularTaskFailure
from .failures import FailureState

logger = logging.getLogger("gae_deferred")

_LEGACY_MODULES = ("google.appengine.ext.deferred.deferred", "google.appengine.ext.deferred")
_PROTOCOL_0_STARTS = (b"(", b"c", b"]", b"}")


class _DeferredTaskEntity(ndb.Model):
    """The legacy library's spilled payload: ``data`` is the pickled call."""

    data = ndb.BlobProperty()
    _use_cache = False
    _use_global_cache = False


def is_legacy_pickle(body: bytes | bytearray) -> bool:
    """Whether ``body`` looks like the legacy library's pickle (protocol 2, or 0/1)."""
    head = bytes(body[:2])
    if head[:1] == b"\x80":
        return len(head) == 2 and head[1] <= 2
    return head[:1] in _PROTOCOL_0_STARTS


def refusal(task: TaskInfo, today: datetime.date | None = None) -> str | None:
    """Why a legacy pickle may not run for ``task`` now, or None when it may."""
    until = settings().legacy_pickles_until
    if until is None:
        return "legacy pickles are refused (configure legacy_pickles_until to drain a queue)"
    today = today or datetime.datetime.now(datetime.UTC).date()
    if today > until:
        return f"legacy pickles were run until {until.isoformat()}; refused since"
    if not os.environ.get("GAE_ENV"):
        return "legacy pickles run only on App Engine (GAE_ENV set)"
    if not task.app_engine:
        return "legacy pickles run only for App Engine's own task headers (X-AppEngine-*)"
    return None


def execute(body: bytes | bytearray, task: TaskInfo) -> execution.TaskOutcome:
    """Run a legacy pickle as the legacy handler did, or refuse it (403, counted)."""
    why = refusal(task)
    if why is not None:
        logger.error("rejected legacy pickled task %s on %s: %s", task.name, task.queue, why)
        refusals.record("legacy-pickle", task, why)
        return execution.TaskOutcome(execution.FORBIDDEN, "forbidden", why)
    refusals.legacy_run()
    started = time.perf_counter()
    with ndb_context():
        outcome, function = _run(bytes(body), task)
    metrics.observe_outcome(function, task.queue, time.perf_counter() - started, outcome.result, 0)
    return outcome


def _run(body: bytes, task: TaskInfo) -> tuple[execution.TaskOutcome, str]:
    header: dict[str, Any] = {"function": "?", "python": "2.7", "serializer": "legacy-pickle"}
    attempt = execution._Attempt(
        task=task,
        body=body,
        env=envelope.Envelope(header=header, body=body, flags=0, size=len(body)),
    )
    call = None
    try:
        call = loads(body)
        obj, args, kwargs = call
        header["function"] = envelope.function_name(obj)
        header["args"] = envelope.args_preview(args, kwargs)
        logger.warning(
            "running legacy pickled task %s on %s: %s (python27 drain until %s)",
            task.name,
            task.queue,
            header["function"],
            settings().legacy_pickles_until,
        )
        with running(task):
            obj(*args, **kwargs)
    except SingularTaskFailure:
        outcome = execution.TaskOutcome(execution.RETRY_QUIETLY, "retry", "SingularTaskFailure")
    except PayloadLoadError as exc:
        logger.error("legacy pickled task %s cannot load: %s", task.name, exc)
        outcome = execution._record(attempt, exc, FailureState.DEAD)
    except PermanentTaskFailure as exc:
        logger.warning("legacy pickled task %s failed permanently: %s", task.name, exc)
        outcome = execution._record(_resealed(attempt, call), exc, FailureState.PERMANENT)
    except Exception as exc:
        logger.exception("legacy pickled task %s (%s) failed", task.name, header["function"])
        last = execution.is_last_attempt(task, header)
        state = FailureState.DEAD if last else FailureState.RETRYING
        outcome = execution._record(_resealed(attempt, call), exc, state)
    else:
        if task.retry_count:
            failures.resolve(attempt.failure_id)
        outcome = execution.TaskOutcome(execution.OK, "ok")
    return outcome, header["function"]


def _resealed(attempt: execution._Attempt, call: tuple | None) -> execution._Attempt:
    """The attempt, its failure to keep the call as a signed envelope that a retrigger runs on
    this runtime (the legacy pickle itself when the call cannot be re-sealed)."""
    if call is not None:
        try:
            attempt.body = envelope.build(*call, origin="python27")
        except Exception as exc:
            logger.warning("legacy call of %s kept as its pickle: %s", attempt.task.name, exc)
    return attempt


def loads(data: bytes) -> tuple[Any, tuple, dict]:
    """Unpickle a legacy body into (callable, args, kwargs); PayloadLoadError if it cannot."""
    try:
        obj, args, kwargs = _Py2Unpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise PayloadLoadError(
            f"cannot load legacy pickled payload: {type(exc).__name__}: {exc}; it was written "
            f"by the python27 deferred library, this runtime is Python {envelope.PYTHON_VERSION}"
        ) from exc
    return obj, tuple(args), dict(kwargs)


def run_from_datastore(key: str) -> Any:
    """The legacy spilled payload ``key`` (a ``_DeferredTaskEntity``'s urlsafe key): run it and
    delete it after success or PermanentTaskFailure, as the legacy library did."""
    entity = ndb.Key(urlsafe=key.encode() if isinstance(key, str) else key).get()
    if entity is None or not isinstance(entity, _DeferredTaskEntity):
        raise PermanentTaskFailure(f"legacy spilled payload {key} is gone")
    obj, args, kwargs = loads(entity.data)
    try:
        result = obj(*args, **kwargs)
    except PermanentTaskFailure:
        entity.key.delete()
        raise
    entity.key.delete()
    return result


def invoke_member(obj: Any, membername: str, *args: Any, **kwargs: Any) -> Any:
    """The legacy library's wrapper of a bound method."""
    return getattr(obj, membername)(*args, **kwargs)


_LEGACY_NAMES = {"run_from_datastore": run_from_datastore, "invoke_member": invoke_member}
_DATETIME_TYPES = {"datetime": datetime.datetime, "date": datetime.date, "time": datetime.time}


def _datetime_from(kind: type) -> Any:
    """Python 2 pickles a datetime as its bytes; a UTF-8-decoded state goes back to them."""

    def make(state: Any = None, *rest: Any) -> Any:
        if isinstance(state, str):
            state = state.encode("utf-8")
        return kind(state, *rest)

    return make


class _Py2Unpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """pickle's Python unpickler: its per-string hook decides str or bytes for each Python 2
    ``str`` (the C unpickler takes one encoding for all), and legacy names map to ours."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, fix_imports=True, encoding="utf-8")

    def _decode_string(self, value: bytes) -> str | bytes:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value

    def find_class(self, module: str, name: str) -> Any:
        if module in _LEGACY_MODULES and name in _LEGACY_NAMES:
            return _LEGACY_NAMES[name]
        if module == "datetime" and name in _DATETIME_TYPES:
            return _datetime_from(_DATETIME_TYPES[name])
        return super().find_class(module, name)
