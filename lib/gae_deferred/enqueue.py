"""defer(): turn a call into a Cloud Tasks App Engine task, spilling big payloads to Datastore.

from gae_deferred import defer

defer(report.build, account_id, _queue="reports", _countdown=30)
defer(lambda: cleanup(tmp_path))                 # closures work: cloudpickle
defer(index_all, big_list)                       # > 100 KB: spilled, the task carries a reference

@ndb.transactional()
def pay(order):
    order.put()
    defer(send_receipt, order.key.id(), _transactional=True)   # only if the transaction commits

One send path: ``send(calls, concurrency)`` sends any number of calls prepared by
``prepare_defer`` (the one parser of defer()'s options); defer() is ``send([call])`` and raises
its one error, batch() is ``send(calls)`` at the end of its block (docs/architecture.md walks it).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb, tasks_v2

from . import _ndb_rpc, _outcome, cloud_tasks, envelope, spillover, task_backoff, tracing
from ._config import settings
from ._datastore import current_namespace, ndb_context
from .cloud_tasks import Outcome, TaskSpec, create_task, short_name, task_path, valid_queue
from .errors import (
    BadTransactionStateError,
    DatastoreRefusedError,
    DatastoreUnavailableError,
    DeferError,
    EnqueueError,
    EnqueueOutcomeUnknown,
    InvalidTaskError,
    InvalidTaskNameError,
    TaskAlreadyExistsError,
)
from .retry import TaskRetryOptions
from .spillover import reference

logger = logging.getLogger("gae_deferred")

_URL_UNSAFE = re.compile(r"[^A-Za-z0-9_.]+")
_CONTENT_TYPE = {"Content-Type": "application/octet-stream"}


@dataclasses.dataclass(frozen=True)
class DeferredTask:
    """What defer() created. ``name`` is the short task name; ``path`` the full resource name.

    The attributes legacy code read from the ``taskqueue.Task`` that ``deferred.defer`` returned
    are here too: ``queue_name``, ``url``, ``headers``, ``eta``, ``payload`` (the task's body),
    ``was_enqueued`` (False for a transactional defer until its transaction commits),
    ``method`` (``"POST"``), ``size`` (legacy's count: method, body, URL and headers),
    ``retry_count`` (0: a new task), ``target`` (``"version.service"``, ``"service"``, or None
    for the default routing), ``retry_options`` (a TaskRetryOptions, or None), ``tag``
    (None: push tasks have none), ``eta_posix`` (the ETA in seconds since the epoch) and
    ``was_deleted`` (False).
    """

    name: str
    path: str
    queue: str
    eta: datetime.datetime
    function: str
    spilled: bool
    payload_bytes: int
    task_bytes: int
    stored_bytes: int = 0
    chunks: int = 0
    payload_id: str | None = None
    transactional: bool = False
    url: str = ""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    payload: bytes = dataclasses.field(default=b"", repr=False, compare=False)
    #: App Engine routing: service, version, instance (empty: the default).
    routing: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: The task's own retry options (the envelope header's ``retry``).
    retry: Mapping[str, float] = dataclasses.field(default_factory=dict)
    method: str = "POST"
    tag: None = None
    retry_count: int = 0
    was_deleted: bool = False

    @property
    def queue_name(self) -> str:
        return self.queue

    @property
    def was_enqueued(self) -> bool:
        return not self.transactional

    @property
    def size(self) -> int:
        """Legacy ``Task.size``: method, body, URL and each header as ``key: value\\r\\n``."""
        headers = sum(len(key) + len(value) + 4 for key, value in self.headers.items())
        return len(self.method) + len(self.payload) + len(self.url) + headers

    @property
    def target(self) -> str | None:
        """Legacy ``Task.target``: ``"version.service"`` or ``"service"``; None when the task
        goes to the default service's serving version."""
        parts = [self.routing.get("version"), self.routing.get("service")]
        named = [part for part in parts if part]
        return ".".join(named) if named else None

    @property
    def retry_options(self) -> TaskRetryOptions | None:
        return TaskRetryOptions(**self.retry) if self.retry else None

    @property
    def eta_posix(self) -> float:
        return self.eta.timestamp()


@dataclasses.dataclass(frozen=True, init=False)
class PreparedCall:
    """A call serialized into its envelope and bound to the task it will be sent as."""

    spec: TaskSpec
    #: The envelope: bytes, or for a call with a big argument its unjoined parts (Sealed).
    data: bytes | envelope.Sealed
    header: dict[str, Any]
    transactional: bool

    def __init__(
        self,
        spec: TaskSpec,
        data: bytes | envelope.Sealed,
        header: dict[str, Any],
        transactional: bool,
    ) -> None:
        # Frozen all the same (no setattr): the instance dict written directly instead of
        # object.__setattr__ per field.
        fields = self.__dict__
        fields["spec"] = spec
        fields["data"] = data
        fields["header"] = header
        fields["transactional"] = transactional


def defer(obj: Callable, *args: Any, **kwargs: Any) -> DeferredTask:
    """Run ``obj(*args, **kwargs)`` later in a task; returns a description of the task.

    Options keep the legacy meaning (:func:`prepare_defer` reads them): ``_countdown`` seconds
    or an ``_eta`` datetime, a task ``_name`` (a duplicate raises TaskAlreadyExistsError),
    ``_queue``, ``_url``, extra ``_headers``, ``_target`` ("service" or "version.service") or
    ``_service``/``_version``/``_instance`` routing, ``_retry_options`` (task_retry_limit and
    task_age_limit are enforced per task by the handler; Cloud Tasks applies backoffs per
    queue), and ``_transactional`` to enqueue only if the surrounding ndb transaction commits.
    Any other defer is independent of a surrounding transaction: its spilled payload is written
    outside it, and the task runs whether the transaction commits or not, as in the legacy
    library.
    """
    outcome = send([prepare_defer(obj, *args, **kwargs)])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def prepare_defer(
    obj: Callable,
    *args: Any,
    _countdown: float | None = None,
    _eta: datetime.datetime | None = None,
    _name: str | None = None,
    _queue: str | None = None,
    _url: str | None = None,
    _headers: Mapping[str, str] | None = None,
    _target: str | None = None,
    _service: str | None = None,
    _version: str | None = None,
    _instance: str | None = None,
    _retry_options: Any = None,
    _transactional: bool = False,
    **kwargs: Any,
) -> PreparedCall:
    """defer()'s arguments, legacy options and all, as a PreparedCall (defer() and
    ``batch().defer()`` both take exactly this); nothing is sent yet."""
    return prepare_call(
        obj,
        args,
        kwargs,
        countdown=_countdown,
        eta=_eta,
        name=_name,
        queue=_queue,
        url=_url,
        headers=_headers,
        routing=_routing(_target, _service, _version, _instance),
        retry_options=_retry_options,
        transactional=_transactional,
    )


def check_sendable(call: PreparedCall) -> None:
    """What send() would refuse before any RPC, checked now (``batch().defer()`` raises at
    once): a payload over ``max_payload_bytes``, a transactional call outside a transaction."""
    if call.transactional or not fits_inline(call):
        spillover.check_size(call.data, call.header)
    if call.transactional:
        _require_transaction()


def send(calls: Sequence[PreparedCall], concurrency: int = 1) -> list[DeferredTask | Exception]:
    """Send prepared calls: one DeferredTask, or the error that stopped it, per call (an error
    that is no DeferError and comes before any task, e.g. a bug, is raised).

    Transactional calls are written in the caller's transaction and their tasks created once it
    commits. Of the others, every payload that spills is written first (shared commits, outside
    any transaction), then every task is created: ``cloud_tasks.create_tasks`` (batches per
    queue, ``concurrency`` in flight), or CreateTask for a single call. A call Cloud Tasks finds
    too large after all is spilled and sent again.
    """
    outcomes: list[Any] = [None] * len(calls)
    transactional = [i for i, call in enumerate(calls) if call.transactional]
    if transactional:
        _send_transactional(calls, transactional, outcomes, concurrency)
    inline: list[int] = []
    spilled: list[int] = []
    for index, call in enumerate(calls):
        if not call.transactional:
            (inline if fits_inline(call) else spilled).append(index)
    too_large = _send_now(calls, inline, spilled, outcomes, concurrency)
    if too_large:
        _send_now(calls, [], too_large, outcomes, concurrency)
    return outcomes


def fits_inline(call: PreparedCall) -> bool:
    """Whether the call's envelope travels in the task itself (else it spills)."""
    return call.spec.size(call.data) <= settings().spill_threshold


#: A task to create: (index of its call, its spec, its body, its spilled record or None).
_Work = tuple[int, TaskSpec, bytes, "spillover.DeferredPayload | None"]


def _send_now(
    calls: Sequence[PreparedCall],
    inline: list[int],
    spilled: list[int],
    outcomes: list[Any],
    concurrency: int,
) -> list[int]:
    """Write the spilled payloads, then create every task; returns the inline calls Cloud Tasks
    found too large (to spill)."""
    work: list[_Work] = [(i, calls[i].spec, envelope.as_bytes(calls[i].data), None) for i in inline]
    if spilled:
        work += _write_spilled(calls, spilled, outcomes)
    created = _create([(spec, body) for _, spec, body, _ in work], concurrency)
    too_large: list[int] = []
    for (index, spec, body, record), (task, error) in zip(work, created, strict=True):
        if record is not None:
            outcomes[index] = _spilled_outcome(record, spec, body, error)
        elif error is None:
            outcomes[index] = _described_inline(calls[index], task, body)
        elif _too_large(error):
            function = calls[index].header["function"]
            logger.info("Cloud Tasks says %s is too large; spilling it", function)
            too_large.append(index)
        else:
            outcomes[index] = _refused(error)
    return too_large


def _create(items: list[tuple[TaskSpec, bytes]], concurrency: int) -> list[Outcome]:
    if len(items) == 1:
        # defer(): one CreateTask, with nothing to group or overlap.
        return cloud_tasks.map_concurrently(lambda item: create_task(*item), items, 1)
    return cloud_tasks.create_tasks(items, concurrency)


def _too_large(error: Exception) -> bool:
    return isinstance(error, api_exceptions.InvalidArgument) and "too large" in str(error).lower()


def _refused(error: Exception) -> Exception:
    """An inline call's error as defer() raises it (Cloud Tasks' refusal as an EnqueueError)."""
    if not isinstance(error, api_exceptions.InvalidArgument):
        return error
    refusal = EnqueueError(f"Cloud Tasks refused the task: {error.message}")
    refusal.__cause__ = error
    return refusal


def prepare_call(
    obj: Callable,
    args: tuple,
    kwargs: dict[str, Any],
    *,
    countdown: float | None = None,
    eta: datetime.datetime | None = None,
    name: str | None = None,
    queue: str | None = None,
    url: str | None = None,
    headers: Mapping[str, str] | None = None,
    routing: dict[str, str] | None = None,
    retry_options: Any = None,
    transactional: bool = False,
) -> PreparedCall:
    """Check the options and serialize the call; nothing is sent yet (defer() and batch()).

    Every task gets a name (``d-<random hex>`` unless the caller names it) and its envelope is
    signed together with that name and queue: the handler runs an envelope only as the task it
    was made for, so a body replayed as another task is refused.
    """
    function = envelope.function_name(obj)
    # One look at the current request: its trace goes into the task's headers and envelope
    # (tracing.task_headers() and envelope_fields(), read once).
    trace = tracing.current()
    spec = _task_spec(function, countdown, eta, name, queue, url, headers, routing, trace)
    extra = trace.header_fields() if trace is not None else {}
    namespace = (headers and _header_namespace(headers)) or current_namespace()
    if namespace:
        # The task runs in the deferring code's namespace (legacy carried it in a header).
        extra = {**extra, "namespace": namespace}
    if retry_options is not None:
        retry = _retry_dict(retry_options)
        if retry:
            extra = {**extra, "retry": retry}
        if task_backoff.has_own_backoff(extra):
            # Its retries are new tasks (task_backoff): they go where this one goes.
            request = {"url": spec.url, "headers": spec.headers, "routing": spec.routing}
            extra[task_backoff.REQUEST] = request
    data, header = envelope.build_call(
        obj,
        args,
        kwargs,
        function,
        extra,
        task=spec.name,
        queue=spec.queue,
        eta_ms=int(spec.eta.timestamp() * 1000),
    )
    return PreparedCall(spec, data, header, bool(transactional))


def _routing(
    target: str | None, service: str | None, version: str | None, instance: str | None
) -> dict[str, str]:
    if not (target or service or version or instance):
        return affinity_routing()
    routing: dict[str, str] = {}
    if target:
        # Legacy targets read "service" or "version.service".
        parts = target.split(".")
        if len(parts) > 2 or not all(parts):
            raise InvalidTaskError(f"_target {target!r} must be 'service' or 'version.service'")
        routing["service"] = parts[-1]
        if len(parts) == 2:
            routing["version"] = parts[0]
    for field, value in (("service", service), ("version", version), ("instance", instance)):
        if value:
            routing[field] = value
    return routing


def affinity_routing() -> dict[str, str]:
    """Where a task the call does not route goes: on App Engine (GAE_VERSION set), back to the
    version and service that made it, as the legacy task queue did by the enqueuing request's
    Host (``version_affinity``); elsewhere, or with affinity off, Cloud Tasks' default routing
    (the queue's target, else the default service's serving version). HTTP-target tasks
    go to a URL: no routing."""
    current = settings()
    if not (current.version_affinity and current.running_version) or current.http_target:
        return {}
    routing = {"version": current.running_version}
    if current.running_service:
        routing["service"] = current.running_service
    return routing


def _retry_dict(options: Any) -> dict[str, float]:
    return TaskRetryOptions.from_option(options).as_dict() if options is not None else {}


def _task_spec(
    function: str,
    countdown: float | None,
    eta: datetime.datetime | None,
    name: str | None,
    queue: str | None,
    url: str | None,
    headers: Mapping[str, str] | None,
    routing: dict[str, str] | None,
    trace: tracing.RequestTrace | None,
) -> TaskSpec:
    current = settings()
    queue = queue or current.default_queue
    if not isinstance(queue, str) or not valid_queue(queue):
        raise DeferError(f"_queue {queue!r} is not a valid queue name (letters, digits, hyphens)")
    if name is not None and (not isinstance(name, str) or not cloud_tasks.TASK_NAME.match(name)):
        raise InvalidTaskNameError(
            f"_name {name!r} is not a valid task name (1-500 letters, digits, '_' or '-')"
        )
    if countdown is not None and eta is not None:
        raise InvalidTaskError("pass _countdown or _eta, not both")
    now = datetime.datetime.now(datetime.UTC)  # spillover.now(), without its frame
    if countdown is not None:
        if (
            isinstance(countdown, bool)
            or not isinstance(countdown, int | float)
            or not math.isfinite(countdown)
            or countdown < 0
        ):
            raise InvalidTaskError(
                f"_countdown must be a number of seconds >= 0, not {countdown!r}"
            )
        try:
            when = now + datetime.timedelta(seconds=countdown)
        except OverflowError:
            raise InvalidTaskError(
                f"_countdown of {countdown!r} seconds is past the last date Python can hold"
            ) from None
    elif eta is not None:
        if not isinstance(eta, datetime.datetime):
            raise InvalidTaskError(f"_eta must be a datetime, not {type(eta).__name__}")
        when = eta if eta.tzinfo else eta.replace(tzinfo=datetime.UTC)
    else:
        when = now
    extra_headers = _checked_headers(headers) if headers else None
    if url is None:
        url = _task_url(current.task_url, function)
    elif not isinstance(url, str) or not url.startswith("/"):
        raise InvalidTaskError(f"_url must be a path starting with '/', not {url!r}")
    task_headers = dict(_CONTENT_TYPE)
    if trace is not None:
        task_headers["traceparent"] = trace.traceparent
    if extra_headers:
        task_headers.update(extra_headers)
    return TaskSpec(queue, url, task_headers, when, name or cloud_tasks.new_task_name(), routing)


def _checked_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    checked = {}
    for key, value in (headers or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidTaskError(f"_headers must map str to str; got {key!r}: {value!r}")
        lowered = key.lower()
        if lowered.startswith("x-appengine-"):
            # Legacy let apps pass these; App Engine set or ignored them. The namespace one is
            # honoured as the task's namespace (prepare_call reads it).
            if lowered != NAMESPACE_HEADER:
                _warn_dropped(_FAIL_FAST.get(lowered, lowered))
            continue
        if lowered.startswith("x-cloudtasks-"):
            raise InvalidTaskError(f"_headers may not set {key}: Cloud Tasks sets it")
        checked[key] = value
    return checked


#: Legacy's header naming the namespace a task runs in (taskqueue.Task set it by default).
NAMESPACE_HEADER = "x-appengine-current-namespace"
#: Both spellings apps used for "do not retry on a busy instance": one header, one warning.
_FAIL_FAST = {"x-appengine-failfast": "x-appengine-fail-fast"}


def _header_namespace(headers: Mapping[str, str]) -> str | None:
    """The namespace an ``X-AppEngine-Current-Namespace`` entry of ``_headers`` names."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == NAMESPACE_HEADER and isinstance(value, str):
            return value
    return None


@functools.cache
def _warn_dropped(header: str) -> None:
    """Logged once per process and header: legacy apps set such headers on every call."""
    if header == "x-appengine-fail-fast":
        logger.warning(
            "_headers: X-AppEngine-Fail-Fast has no Cloud Tasks equivalent and is dropped; the "
            "queue's retry settings apply"
        )
    else:
        logger.warning("_headers: %s is set by App Engine and Cloud Tasks; dropped", header)


def task_url(function: str) -> str:
    """The default task URL: the handler's path plus the function name, so logs show what ran."""
    return _task_url(settings().task_url, function)


@functools.lru_cache(maxsize=1024)
def _task_url(base: str, function: str) -> str:
    # A process defers a handful of functions over and over: the regex runs once for each.
    return f"{base}/{_URL_UNSAFE.sub('_', function)}"


def _described_inline(call: PreparedCall, created: Any, data: bytes) -> DeferredTask:
    return DeferredTask(
        name=short_name(created.name),
        path=created.name,
        queue=call.spec.queue,
        eta=call.spec.eta,
        function=call.header["function"],
        spilled=False,
        payload_bytes=call.header["raw_bytes"],
        task_bytes=len(data),
        url=call.spec.url,
        headers=call.spec.headers,
        payload=data,
        routing=call.spec.routing or {},
        retry=call.header.get("retry") or {},
    )


def _spill_entities(
    call: PreparedCall,
) -> tuple[spillover.DeferredPayload, spillover.PayloadChunks]:
    """The record and chunks for a call's payload, not written yet (inside an ndb context:
    keys take the client's project)."""
    return spillover.build_record(
        spillover.new_payload_id(),
        call.data,
        call.header,
        queue=call.spec.queue,
        task_name=call.spec.name or "",
        eta=call.spec.eta,
        task=call.spec.to_json(),
        transactional=call.transactional,
    )


def _described_spilled(
    record: spillover.DeferredPayload, spec: TaskSpec, task_body: bytes
) -> DeferredTask:
    return DeferredTask(
        name=spec.name or "",
        path=task_path(spec.queue, spec.name or ""),
        queue=spec.queue,
        eta=spec.eta,
        function=record.function,
        spilled=True,
        payload_bytes=record.payload_bytes,
        task_bytes=len(task_body),
        stored_bytes=record.stored_bytes,
        chunks=record.chunks,
        payload_id=record.key.id(),
        transactional=record.transactional,
        url=spec.url,
        headers=spec.headers,
        payload=task_body,
        routing=spec.routing or {},
        retry=(record.meta or {}).get("retry") or {},
    )


def _write_spilled(
    calls: Sequence[PreparedCall], indexes: list[int], outcomes: list[Any]
) -> list[_Work]:
    """Write the calls' payloads in shared commits, outside any transaction; returns the tasks
    to create for them (none if the write failed: then each call has its error)."""
    built = []
    with ndb_context():
        for index in indexes:
            try:
                built.append((index, _spill_entities(calls[index])))
            except DeferError as exc:
                outcomes[index] = exc
        entities = [entity for _, entity in built]
        try:
            _write_outside_transaction(entities)
        except DeferError as exc:
            for index, _ in built:
                outcomes[index] = exc
            return []
    return [(index, calls[index].spec, reference(record), record) for index, (record, _) in built]


def _spilled_outcome(
    record: spillover.DeferredPayload, spec: TaskSpec, body: bytes, error: Exception | None
) -> DeferredTask | Exception:
    """A spilled call once CreateTask answered: its task, or its error once the payload is
    deleted (or EnqueueOutcomeUnknown: the sweeper will create the task)."""
    if error is None:
        return _described_spilled(record, spec, body)
    try:
        with ndb_context():
            _raise_unless_forgotten(record, error)
    except EnqueueOutcomeUnknown as unknown:
        return unknown
    return error


def _write_outside_transaction(entities: spillover.Payloads) -> None:
    """Write spilled records and chunks in commits of their own, never in the caller's
    transaction: a defer that is not transactional must not depend on that transaction.

    A write that failed for sure raises DatastoreUnavailableError (nothing stored, nothing will
    run). One that failed after it may have landed (a lost reply, a deadline) is settled by
    reading the records back: all there, the write succeeded; else EnqueueOutcomeUnknown, since
    a commit still in flight may land yet (the sweeper would then run it, once).
    """
    try:
        ndb.non_transactional()(spillover.write_many)(entities)
    except api_exceptions.GoogleAPIError as exc:
        if _outcome.may_have_landed(exc):
            _settle_spill_write(entities, exc)
            return
        size = sum(record.stored_bytes or 0 for record, _ in entities)
        what = f"{len(entities)} spilled payload(s) of {size:,} bytes"
        if _ndb_rpc.is_refusal(exc):
            raise DatastoreRefusedError(f"Datastore refused to store {what}: {exc}") from exc
        raise DatastoreUnavailableError(f"could not store {what}: {exc}") from exc


def _settle_spill_write(entities: spillover.Payloads, cause: Exception) -> None:
    """After a spill write whose outcome is unknown: return if every record is in Datastore
    (a record is written with or after its last chunk, so its chunks are too), else raise
    EnqueueOutcomeUnknown naming what to look up."""
    records = [record for record, _ in entities]
    time.sleep(_ndb_rpc.SETTLE_PAUSE_SECONDS)
    try:
        found = ndb.non_transactional()(_ndb_rpc.lookup)(
            [record.key for record in records],
            in_transaction=False,
            retries=_ndb_rpc.SETTLE_RETRIES,
        )
    except api_exceptions.GoogleAPIError as exc:
        found, cause = [None] * len(records), _Chained(cause, exc)
    if all(entity is not None for entity in found):
        logger.info("spill write of %d payload(s) landed though its answer was lost", len(found))
        return
    missing = [record for record, entity in zip(records, found, strict=True) if entity is None]
    first = missing[0]
    raise EnqueueOutcomeUnknown(
        f"storing spilled payload(s) {[record.key.id() for record in missing]} failed after the "
        f"commit may have been applied ({cause}): if it was, the sweeper creates task(s) "
        f"{[record.task_name for record in missing]} once; do not defer again, look the task "
        "or payload up",
        task_name=first.task_name,
        queue=first.queue,
        payload_id=first.key.id(),
    ) from (cause.first if isinstance(cause, _Chained) else cause)


class _Chained(Exception):
    """A write's error and the error of the read that was to settle it, in one message."""

    def __init__(self, first: Exception, second: Exception) -> None:
        super().__init__(f"{first}; reading it back failed too: {second}")
        self.first = first


def _raise_unless_forgotten(record: spillover.DeferredPayload, cause: Exception) -> None:
    """After CreateTask failed for a spilled payload: delete the payload, or, if the task may
    exist or the payload cannot be deleted, raise EnqueueOutcomeUnknown (the sweeper creates the
    task from the record if it is missing, so the caller must not defer again)."""
    payload_id = record.key.id()
    names = {"task_name": record.task_name, "queue": record.queue, "payload_id": payload_id}
    if isinstance(cause, EnqueueOutcomeUnknown):
        raise EnqueueOutcomeUnknown(
            f"{cause}; its payload {payload_id} is kept and the sweeper creates the task if it "
            "is missing: do not defer it again",
            **names,
        ) from cause
    try:
        ndb.non_transactional()(spillover.delete)(payload_id, record.chunks)
    except api_exceptions.GoogleAPIError as exc:
        raise EnqueueOutcomeUnknown(
            f"the task was not created ({cause}) and its spilled payload {payload_id} could not "
            f"be deleted ({exc}): the sweeper will create the task, so do not defer it again",
            **names,
        ) from cause


def _require_transaction() -> ndb.Context:
    context = ndb.get_context(raise_context_error=False)
    if context is None or not context.in_transaction():
        raise BadTransactionStateError("_transactional=True needs an active ndb transaction")
    return context


def _send_transactional(
    calls: Sequence[PreparedCall], indexes: list[int], outcomes: list[Any], concurrency: int
) -> None:
    try:
        tasks = _defer_transactional([calls[i] for i in indexes], concurrency)
    except DeferError as exc:
        for index in indexes:
            outcomes[index] = exc
        return
    for index, task in zip(indexes, tasks, strict=True):
        outcomes[index] = task


def _defer_transactional(calls: list[PreparedCall], concurrency: int) -> list[DeferredTask]:
    """Write the payloads in the caller's transaction; create the tasks once it commits."""
    context = _require_transaction()
    spilled = [_spill_entities(call) for call in calls]
    bodies = [reference(record) for record, _ in spilled]
    spillover.write_in_transaction(spilled)
    first = spilled[0][0]
    _ndb_rpc.settle_transaction_commit(
        first.key,
        lambda exc: EnqueueOutcomeUnknown(
            f"the transaction's commit failed after it may have been applied ({exc}), and "
            f"reading payload {first.key.id()} back failed too: if it committed, the sweeper "
            f"creates task {first.task_name} (and the others deferred in it) once; do not rerun "
            "the transaction unless it is idempotent by your own key (@idempotent(key=...))",
            task_name=first.task_name,
            queue=first.queue,
            payload_id=first.key.id(),
        ),
    )
    work = [
        (record, call.spec, body)
        for (record, _), call, body in zip(spilled, calls, bodies, strict=True)
    ]
    context.call_on_commit(lambda: _enqueue_after_commit(work, concurrency))
    return [_described_spilled(record, spec, body) for record, spec, body in work]


def _enqueue_after_commit(
    work: list[tuple[spillover.DeferredPayload, TaskSpec, bytes]], concurrency: int
) -> None:
    """After the commit the payloads are safe; a failed enqueue is repaired by the sweeper."""
    outcomes = _create([(spec, body) for _, spec, body in work], concurrency)
    for (record, _, _), (_, error) in zip(work, outcomes, strict=True):
        if error is not None and not isinstance(error, TaskAlreadyExistsError):
            logger.error(
                "transaction committed but the task for %s was not created; the sweeper will",
                record.key.id(),
                exc_info=error,
            )


def enqueue_record(
    record: spillover.DeferredPayload,
    *,
    name: str | None = None,
    failure_id: str | None = None,
    **overrides: Any,
) -> tasks_v2.Task:
    """(Re-)create the task of a spilled record, e.g. a retrigger or a sweep.

    ``name=None`` reuses the record's task name (the sweeper: ALREADY_EXISTS means it is
    there); a retrigger passes a fresh name, which becomes the record's (Cloud Tasks refuses a
    name used within the last hour, up to 9 days for queues created from queue.yaml), and the
    ``failure_id`` of the failure record the run should update.
    """
    changes: dict[str, Any] = {"failure_id": failure_id} if failure_id else {}
    if name is not None:
        # A new task starts its age (task_age_limit) afresh.
        record.task_name = name
        changes["eta_ms"] = _now_ms()
    spec = record_spec(record, **overrides)
    return create_task(spec, reference(record, **changes))


def enqueue_envelope(
    data: bytes,
    *,
    queue: str,
    name: str,
    routing: dict[str, str],
    failure_id: str | None = None,
) -> tasks_v2.Task:
    """Create a task, due now, for an envelope kept inline (a failure's payload), re-signed for
    the new task (and the ``failure_id`` its run should update)."""
    changes: dict[str, Any] = {"task": name, "queue": queue, "eta_ms": _now_ms()}
    if failure_id:
        changes["failure_id"] = failure_id
    function = str(envelope.read_header(data).get("function") or "unknown")
    spec = TaskSpec(
        queue=queue,
        url=task_url(function),
        headers=dict(_CONTENT_TYPE),
        eta=spillover.now(),
        name=name,
        routing=routing,
    )
    return create_task(spec, envelope.rebind(data, **changes))


def _now_ms() -> int:
    return int(spillover.now().timestamp() * 1000)


def record_spec(record: spillover.DeferredPayload, **overrides: Any) -> TaskSpec:
    """The task a spilled record was created for (URL, headers, routing), due now."""
    stored = record.task or {}
    values: dict[str, Any] = {
        "queue": record.queue,
        "url": stored.get("url") or settings().task_url,
        "headers": dict(stored.get("headers") or {}),
        "eta": spillover.now(),
        "name": record.task_name,
        "routing": dict(stored.get("routing") or {}),
    }
    values.update(overrides)
    return TaskSpec(**values)
