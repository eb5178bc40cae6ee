"""Testing code that defers: capture tasks instead of sending them, then run them in-process.

The replacement for testbed's taskqueue stub::

    from gae_deferred import defer
    from gae_deferred.testing import capture_tasks

    with capture_tasks() as queue:          # no Cloud Tasks, no signing key needed
        defer(fan_out, 3, _countdown=30)
        assert queue.tasks[0].queue == "default"
        assert queue.tasks[0].function.endswith("fan_out")
        queue.run_all()                     # runs them, and the tasks they defer, until empty

Tasks run through :func:`gae_deferred.execute_task`, as the task handler runs them: signatures
are checked, spilled payloads are read from Datastore and deleted after success, failures are
recorded, and ``current_task()`` answers inside the task. With no Datastore configured (no
``DATASTORE_EMULATOR_HOST``, no ``configure(ndb_client=...)``) the capture keeps spilled payloads
in memory, in gae_deferred's Datastore emulator served from the test process (the ``testing``
extra), and opens an ndb context on it for the block, as testbed's datastore stub did.

Under pytest the ``deferred_tasks`` fixture is the same capture, with nothing to import.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import datetime
import itertools
import os
import secrets
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import ndb, tasks_v2

from . import _config, _datastore, cloud_tasks, context, defaults, envelope, execution
from .errors import ConfigurationError, PermanentTaskFailure, SingularTaskFailure, TaskFailed
from .queue_config import QueueDefinition, load_queue_yaml

#: Signs tasks inside a capture when no signing key is configured; never leaves this process.
_TEST_SIGNING_KEY = secrets.token_bytes(32)
#: The project a capture uses when none is configured (testbed's default app id).
DEFAULT_PROJECT = "testbed-test"
_LEGACY_ETA_FORMAT = "%Y/%m/%d %H:%M:%S"

#: The exception the deferred function raised in the run under way (see _WatchedCall).
_raised: contextvars.ContextVar[BaseException | None] = contextvars.ContextVar(
    "gae_deferred_testing_raised", default=None
)


@dataclasses.dataclass(frozen=True)
class CapturedTask:
    """A task defer() created, as Cloud Tasks would have received it.

    The legacy ``taskqueue.Task`` names work too: ``queue_name``, ``payload``, ``method``.
    """

    name: str
    queue: str
    eta: datetime.datetime
    url: str
    headers: dict[str, str]
    #: The body Cloud Tasks would POST: the signed envelope, or a reference if ``spilled``.
    payload: bytes = dataclasses.field(repr=False)
    #: Dotted name of the deferred callable and a short preview of its arguments.
    function: str
    args: str
    #: Size of the pickled call; ``size`` is what the task itself carries.
    payload_bytes: int
    spilled: bool
    #: Id of the spilled Datastore record (``deferred.run_from_datastore(task.payload_id)``).
    payload_id: str | None
    routing: dict[str, str]
    retry_count: int = 0
    execution_count: int = 0
    #: Creation order; retried tasks get a new one, so they go after the tasks already due.
    sequence: int = 0

    @property
    def size(self) -> int:
        return len(self.payload)

    @property
    def eta_posix(self) -> float:
        return self.eta.timestamp()

    @property
    def target(self) -> str | None:
        """``"version.service"`` or ``"service"``; None for the default routing."""
        named = [
            part for part in (self.routing.get("version"), self.routing.get("service")) if part
        ]
        return ".".join(named) if named else None

    @property
    def queue_name(self) -> str:
        return self.queue

    @property
    def method(self) -> str:
        return "POST"

    def legacy_dict(self) -> dict[str, Any]:
        """This task as testbed's ``taskqueue_stub.GetTasks()`` described it."""
        eta_usec = int(self.eta.timestamp() * 1_000_000)
        headers = [
            *self.headers.items(),
            ("X-AppEngine-QueueName", self.queue),
            ("X-AppEngine-TaskName", self.name),
            ("X-AppEngine-TaskRetryCount", str(self.retry_count)),
            ("X-AppEngine-TaskExecutionCount", str(self.execution_count)),
            ("X-AppEngine-TaskETA", str(eta_usec / 1_000_000)),
        ]
        return {
            "name": self.name,
            "queue_name": self.queue,
            "url": self.url,
            "method": self.method,
            "eta": self.eta.strftime(_LEGACY_ETA_FORMAT),
            "eta_delta": _eta_delta(self.eta),
            "eta_usec": eta_usec,
            "body": base64.b64encode(self.payload),
            "headers": headers,
        }


@dataclasses.dataclass(frozen=True)
class TaskFailure:
    """A captured task that failed for good: it is not retried, as in production.

    ``state`` is ``permanent`` (PermanentTaskFailure, a payload that cannot load) or ``dead``
    (its last allowed attempt failed).
    """

    task: CapturedTask
    exception: BaseException
    state: str

    def __str__(self) -> str:
        return (
            f"{self.task.name} ({self.task.function}) on {self.task.queue}: {self.state}, "
            f"{type(self.exception).__name__}: {self.exception}"
        )


class UnexaminedTaskFailures(AssertionError):
    """Tasks failed for good during a capture and the test never took them with
    ``take_failures()``: a PermanentTaskFailure is an outcome a test should assert on."""


class _WatchedCall(context.running):
    """execute_task's ``running`` block, also keeping the exception the deferred function
    raised: execute_task records and answers failures, while a test wants the exception itself."""

    __slots__ = ()

    def __exit__(self, *exc_info: Any) -> None:
        if exc_info[1] is not None:
            _raised.set(exc_info[1])
        super().__exit__(*exc_info)


class TaskQueue:
    """The tasks of one :func:`capture_tasks` block, and the means to run them.

    ``tasks`` are the queued tasks, due first; ``run(task)`` runs one, ``run_all()`` runs until
    no task is left. A task that raises is queued again with ``retry_count + 1`` (as Cloud Tasks
    retries it) and its exception is raised to the test; SingularTaskFailure is retried without
    raising; a task that fails for good is dropped and kept in ``failures``, which the test must
    take with ``take_failures()`` before the block ends.
    """

    def __init__(self, ndb_client: Any, known_queues: Iterable[str] | None) -> None:
        #: The ndb client tasks run against (the in-memory one unless a Datastore is configured).
        self.ndb_client = ndb_client
        self._known_queues = set(known_queues) if known_queues is not None else None
        #: queue.yaml's definitions, when ``known_queues`` is what load_queue_yaml returned.
        self._definitions: dict[str, QueueDefinition] = (
            dict(known_queues) if isinstance(known_queues, Mapping) else {}
        )
        self._pending: list[CapturedTask] = []
        self._failures: list[TaskFailure] = []
        #: Task names in use per queue: Cloud Tasks refuses a name again for about an hour.
        self._names: dict[str, set[str]] = {}
        self._sequence = itertools.count(1)
        self._auto_names = itertools.count(1)

    # -- what defer() created ------------------------------------------------------------

    def create_task(self, parent: str, task: tasks_v2.Task) -> tasks_v2.Task:
        """Take a task instead of Cloud Tasks (the ``cloud_tasks._sink`` hook), with Cloud Tasks'
        refusals: an unknown queue (when queue.yaml is known) and a name used before."""
        queue = cloud_tasks.short_name(parent)
        if self._known_queues is not None and queue not in self._known_queues:
            raise api_exceptions.NotFound(f"Queue does not exist: {queue}")
        names = self._names.setdefault(queue, set())
        name = cloud_tasks.short_name(task.name)
        if name in names:
            raise api_exceptions.AlreadyExists(f"Requested entity already exists: {name}")
        names.add(name)
        created = tasks_v2.Task(task)
        created.name = f"{parent}/tasks/{name}"
        self._pending.append(self._captured(name, queue, created))
        return created

    def new_task_name(self, prefix: str) -> str:
        """testbed named unnamed tasks task1, task2, ...: legacy tests assert on those names."""
        taken = set().union(*self._names.values())
        while True:
            name = f"task{next(self._auto_names)}"
            if name not in taken:
                return name

    def has_task(self, name: str) -> bool:
        """Whether a task of this full name is queued (``cloud_tasks`` tells a tombstone by it)."""
        return any(
            f"{cloud_tasks.queue_path(task.queue)}/tasks/{task.name}" == name
            for task in self._pending
        )

    def _captured(self, name: str, queue: str, task: tasks_v2.Task) -> CapturedTask:
        # An HTTP-target task (http_target set, docs/cloud-run.md) carries a URL, no routing.
        http = "http_request" in task
        request = task.http_request if http else task.app_engine_http_request
        body = bytes(request.body)
        header = envelope.read_header(body)
        routing = None if http else request.app_engine_routing
        return CapturedTask(
            name=name,
            queue=queue,
            eta=datetime.datetime.fromtimestamp(task.schedule_time.timestamp(), datetime.UTC),
            url=urllib.parse.urlsplit(request.url).path if http else request.relative_uri,
            headers=dict(request.headers),
            payload=body,
            function=str(header.get("function", "?")),
            args=str(header.get("args", "")),
            payload_bytes=int(header.get("raw_bytes", len(body))),
            spilled="ref" in header,
            payload_id=(header.get("ref") or {}).get("id"),
            routing={
                field: getattr(routing, field)
                for field in ("service", "version", "instance")
                if routing is not None and getattr(routing, field)
            },
            sequence=next(self._sequence),
        )

    @property
    def tasks(self) -> list[CapturedTask]:
        """The queued tasks of every queue, in the order they would run: by ETA, then creation."""
        return sorted(self._pending, key=lambda task: (task.eta, task.sequence))

    def tasks_in(self, queue: str) -> list[CapturedTask]:
        """The queued tasks of one queue, in the order they would run."""
        return [task for task in self.tasks if task.queue == queue]

    def clear(self, queue: str | None = None) -> None:
        """Drop the queued tasks (of one queue) and forget their names, like testbed's
        FlushQueue: a cleared name can be used again."""
        if queue is None:
            self._pending, self._names = [], {}
            return
        self._pending = [task for task in self._pending if task.queue != queue]
        self._names.pop(queue, None)

    # -- running -------------------------------------------------------------------------

    def run(self, task: CapturedTask) -> execution.TaskOutcome:
        """Run one queued task as the handler would; returns what the handler would answer.

        Raises what the deferred function raised (the task stays queued for its retry, unless
        that was its last attempt); a permanent failure is kept in ``failures`` instead.
        """
        if not any(queued is task for queued in self._pending):
            raise ValueError(f"task {task.name} is not queued in this capture")
        self._pending = [queued for queued in self._pending if queued is not task]
        info = context.TaskInfo(
            name=task.name,
            queue=task.queue,
            retry_count=task.retry_count,
            execution_count=task.execution_count,
            eta=task.eta.timestamp(),
        )
        outcome, raised = self._execute(task.payload, info)
        if outcome.status == execution.OK and outcome.result == "ok":
            return outcome
        if outcome.status == execution.OK and outcome.result == "retrying":
            # Its own backoff: the next attempt is a new task, queued already; raised as the
            # ERROR path raises.
            if raised is not None:
                raise raised
            raise TaskFailed(outcome.message, result=outcome.result)
        if outcome.status == execution.OK and _raised_on_its_last_attempt(raised, outcome):
            # Its own retry options ended it (the handler answered 200): raised, not retried.
            raise raised  # type: ignore[misc]
        if outcome.status == execution.OK:
            self._failures.append(
                TaskFailure(task, raised or PermanentTaskFailure(outcome.message), outcome.result)
            )
            return outcome
        if outcome.status == execution.RETRY_QUIETLY:
            if execution.is_last_attempt(info, envelope.read_header(task.payload)):
                failure = raised or SingularTaskFailure(outcome.message)
                self._failures.append(TaskFailure(task, failure, "dead"))
            else:
                self._retry(task)
            return outcome
        if outcome.status == execution.ERROR:
            if outcome.result != "dead":
                self._retry(task)
            if raised is not None:
                raise raised
            raise TaskFailed(outcome.message, result=outcome.result)
        raise TaskFailed(
            f"the task handler refused task {task.name} with {outcome.status}: {outcome.message}",
            result=outcome.result,
        )

    def _execute(
        self, body: bytes, info: context.TaskInfo
    ) -> tuple[execution.TaskOutcome, BaseException | None]:
        # A fresh contextvars context, as a request has: the task gets its own ndb context and
        # never sees the test's (nor its cache), and the watcher's variable stays in there.
        task_context = contextvars.Context()
        original = execution.running
        execution.running = _WatchedCall
        try:
            outcome = task_context.run(execution.execute_task, body, info)
        finally:
            execution.running = original
        # The test's own ndb context may cache entities the task has since changed.
        caller_context = ndb.get_context(raise_context_error=False)
        if caller_context is not None:
            caller_context.clear_cache()
        return outcome, task_context.get(_raised)

    def _retry(self, task: CapturedTask) -> None:
        self._pending.append(
            dataclasses.replace(
                task,
                retry_count=task.retry_count + 1,
                execution_count=task.execution_count + 1,
                eta=max(task.eta, datetime.datetime.now(datetime.UTC)),
                sequence=next(self._sequence),
            )
        )

    def run_all(self, queue: str | None = None, max_tasks: int = 1000) -> int:
        """Run queued tasks (of one queue), and those they defer, until none is left; returns
        how many ran. Stops with RuntimeError after ``max_tasks`` runs, since a task that defers
        itself forever or keeps asking to be retried would never empty the queue."""
        if max_tasks < 1:
            raise ValueError(f"max_tasks must be at least 1, not {max_tasks!r}")
        ran = 0
        while True:
            pending = self.tasks if queue is None else self.tasks_in(queue)
            if not pending:
                return ran
            if ran >= max_tasks:
                raise RuntimeError(
                    f"run_all() ran {max_tasks} tasks and {len(pending)} are still queued, e.g. "
                    f"{pending[0].name} ({pending[0].function}): does a task defer itself forever "
                    "or keep asking to be retried?"
                )
            self.run(pending[0])
            ran += 1

    @property
    def failures(self) -> tuple[TaskFailure, ...]:
        """Tasks that failed for good, not yet taken."""
        return tuple(self._failures)

    def take_failures(self) -> list[TaskFailure]:
        """Return the tasks that failed for good and forget them: the test has seen them."""
        taken, self._failures = self._failures, []
        return taken

    def check_failures(self) -> None:
        """Raise UnexaminedTaskFailures if a task failed for good and the test did not take it."""
        if self._failures:
            lines = "\n".join(f"  {failure}" for failure in self._failures)
            raise UnexaminedTaskFailures(
                f"{len(self._failures)} deferred task(s) failed for good and the test did not "
                f"take them with take_failures():\n{lines}"
            )

    # -- testbed's taskqueue stub names --------------------------------------------------

    def get_filtered_tasks(
        self,
        url: str | None = None,
        name: str | None = None,
        queue_names: str | Iterable[str] | None = None,
    ) -> list[CapturedTask]:
        """testbed's filter: queued tasks with this URL, name and queue(s)."""
        if isinstance(queue_names, str):
            queue_names = [queue_names]
        wanted_queues = set(queue_names) if queue_names is not None else None
        return [
            task
            for task in self.tasks
            if (url is None or task.url == url)
            and (name is None or task.name == name)
            and (wanted_queues is None or task.queue in wanted_queues)
        ]

    def GetTasks(self, queue_name: str) -> list[dict[str, Any]]:
        """testbed's ``GetTasks``: one queue's tasks as dicts (``body`` is base64); KeyError
        for a queue queue.yaml does not define, as the stub raised."""
        if self._known_queues is not None and queue_name not in self._known_queues:
            raise KeyError(queue_name)
        return [task.legacy_dict() for task in self.tasks_in(queue_name)]

    def GetQueues(self) -> list[dict[str, Any]]:
        """testbed's ``GetQueues``: one dict per queue, by name (``name``, ``max_rate``,
        ``bucket_size``, ``mode``, ``acl``, ``oldest_task``, ``eta_delta``,
        ``tasks_in_queue``, and ``retry_parameters`` where queue.yaml sets them): queue.yaml's
        queues, else ``default`` and every queue holding a task."""
        names = set(self._known_queues or ()) or {defaults.QUEUE}
        names.update(task.queue for task in self._pending)
        return [self._queue_dict(name) for name in sorted(names)]

    def _queue_dict(self, name: str) -> dict[str, Any]:
        definition = self._definitions.get(name)
        queued = self.tasks_in(name)
        described: dict[str, Any] = {
            "name": name,
            "bucket_size": definition.bucket_size if definition else 5,
            "max_rate": definition.rate_text if definition else "5/s",
            "mode": "push",
            "acl": None,
            "oldest_task": queued[0].eta.strftime(_LEGACY_ETA_FORMAT) if queued else "",
            "eta_delta": _eta_delta(queued[0].eta) if queued else "",
            "tasks_in_queue": len(queued),
        }
        retry = definition.retry if definition and definition.line else None
        if retry is not None:
            described["retry_parameters"] = {
                key: value
                for key, value in (
                    ("retry_limit", retry.task_retry_limit),
                    ("age_limit_sec", retry.task_age_limit),
                    ("min_backoff_sec", retry.min_backoff_seconds),
                    ("max_backoff_sec", retry.max_backoff_seconds),
                    ("max_doublings", retry.max_doublings),
                )
                if value is not None
            }
        return described

    def DeleteTask(self, queue_name: str, task_name: str) -> None:
        """testbed's ``DeleteTask``: drop one queued task without leaving a tombstone (its name
        can be used again); nothing happens if there is no such task."""
        self._pending = [
            task
            for task in self._pending
            if not (task.queue == queue_name and task.name == task_name)
        ]
        self._names.get(queue_name, set()).discard(task_name)

    def FlushQueue(self, queue_name: str) -> None:
        """testbed's ``FlushQueue``: :meth:`clear` for one queue (no tombstones left)."""
        self.clear(queue_name)

    def Clear(self) -> None:
        """testbed's ``Clear``: :meth:`clear` for every queue."""
        self.clear()


def _eta_delta(eta: datetime.datetime) -> str:
    """testbed's relative ETA: ``0:00:06 ago`` or ``0:00:30 from now`` (no microseconds)."""
    now = datetime.datetime.now(datetime.UTC)
    delta = abs(eta - now)
    whole = datetime.timedelta(days=delta.days, seconds=delta.seconds)
    return f"{whole} from now" if eta > now else f"{whole} ago"


def _raised_on_its_last_attempt(
    raised: BaseException | None, outcome: execution.TaskOutcome
) -> bool:
    return (
        outcome.result == "dead"
        and raised is not None
        and not isinstance(raised, PermanentTaskFailure | SingularTaskFailure)
    )


@contextlib.contextmanager
def _in_memory_datastore(project: str, index_yaml: str | os.PathLike[str] | None) -> Iterator[Any]:
    """An ndb client on gae_deferred's Datastore emulator, served from this process.

    The emulator rather than a bare in-memory stub: it checks transaction conflicts per entity
    as Datastore does, so a spilled defer() inside a transaction that commits works as in
    production.
    """
    try:
        from .local.datastore import DatastoreEmulator
    except ImportError as exc:
        raise ConfigurationError(
            "capture_tasks() needs a Datastore for spilled payloads and task records: install "
            "the in-memory one with the gae_deferred wheel's [testing] extra (`pip install "
            "'./wheels/gae_deferred-<version>-py3-none-any.whl[testing]'`), or set "
            "DATASTORE_EMULATOR_HOST, or pass ndb_client="
        ) from exc
    with DatastoreEmulator(port=0, index_yaml=index_yaml) as emulator:
        # ndb.Client reads the emulator's address (and uses a plain channel) only when built.
        previous = os.environ.get("DATASTORE_EMULATOR_HOST")
        os.environ["DATASTORE_EMULATOR_HOST"] = f"127.0.0.1:{emulator.port}"
        try:
            client = ndb.Client(project=project)
        finally:
            if previous is None:
                del os.environ["DATASTORE_EMULATOR_HOST"]
            else:
                os.environ["DATASTORE_EMULATOR_HOST"] = previous
        yield client


def _restore_settings(previous: _config.Settings | None) -> None:
    with _config._lock:
        _config._settings = previous


@contextlib.contextmanager
def capture_tasks(
    *,
    queue_yaml: str | os.PathLike[str] | None = None,
    index_yaml: str | os.PathLike[str] | None = None,
    ndb_client: Any = None,
) -> Iterator[TaskQueue]:
    """Capture every task created in the block instead of sending it to Cloud Tasks.

    Without a configured signing key the block signs with a per-process test key; without a
    project it uses ``testbed-test``. ``queue_yaml`` (or the configured one) makes unknown queues
    raise QueueNotFoundError as Cloud Tasks would, and gives the retry limits. The Datastore is
    ``ndb_client``, else the configured one (``configure(ndb_client=...)`` or
    ``DATASTORE_EMULATOR_HOST``), else an in-memory one, validated against ``index_yaml`` if
    given; for the last two the block also opens an ndb context when none is open. Every
    setting is restored on exit, and tasks that failed for good but were never taken raise
    UnexaminedTaskFailures::

        with capture_tasks(queue_yaml="queue.yaml") as queue:
            signup("a@example.com")
            [task] = queue.tasks_in("mail")
            queue.run_all(queue="mail")
    """
    previous_settings = _config._settings
    previous_sink = cloud_tasks._sink
    if previous_sink is not None:
        raise ConfigurationError("capture_tasks() blocks do not nest: one is already capturing")
    current = _config.settings()
    changes: dict[str, Any] = {}
    if current.signing_key is None and current.signing_key_provider is None:
        changes["signing_key"] = _TEST_SIGNING_KEY
    project = current.project or DEFAULT_PROJECT
    changes["project"] = project
    if queue_yaml is not None:
        changes["queue_yaml"] = os.fspath(queue_yaml)
    in_memory = ndb_client is None and current.ndb_client is None
    # The block picks the Datastore (in memory, or the emulator of DATASTORE_EMULATOR_HOST):
    # it also opens the ndb context, unless the test has one open.
    picked = in_memory
    if in_memory and os.environ.get("DATASTORE_EMULATOR_HOST"):
        in_memory = False
        if index_yaml is not None:
            raise ConfigurationError(
                "index_yaml= applies to the in-memory Datastore; DATASTORE_EMULATOR_HOST is set"
            )
    elif not in_memory and index_yaml is not None:
        raise ConfigurationError("index_yaml= applies to the in-memory Datastore, not ndb_client=")
    with contextlib.ExitStack() as stack:
        if in_memory:
            ndb_client = stack.enter_context(_in_memory_datastore(project, index_yaml))
        if ndb_client is not None:
            changes["ndb_client"] = ndb_client
        updated = _config.configure(**changes)
        try:
            known = load_queue_yaml(updated.queue_yaml) if updated.queue_yaml else None
            queue = TaskQueue(_datastore.client(), known)
            cloud_tasks._sink = queue
            if picked and ndb.get_context(raise_context_error=False) is None:
                stack.enter_context(_datastore.client().context(cache_policy=False))
            yield queue
            stack.close()
            queue.check_failures()
        finally:
            cloud_tasks._sink = previous_sink
            _restore_settings(previous_settings)
