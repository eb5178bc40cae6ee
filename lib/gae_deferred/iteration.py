"""iterate(): run a function over every entity of an ndb query, in sharded, resumable tasks.

The job a deferred library does most in an App Engine app is walking a kind: a schema
migration, a backfill, a re-index::

    from gae_deferred import iterate

    def add_thumbnail(picture):               # fn(entity): one entity at a time
        picture.thumbnail = make_thumbnail(picture.data)
        picture.put()

    job = iterate(Picture.query(), add_thumbnail, shards=8, finalize=report_done)

    def fix_batch(pictures):                  # fn(batch): batched=True hands a list
        ndb.put_multi([migrate(p) for p in pictures])

    iterate(Picture.query(Picture.owner == "x"), fix_batch, batched=True, batch_size=200)

How it runs (docs/backfills.md says the same for users):

- **Planning.** ``iterate()`` writes a ``_DeferredJob`` record and defers one planning task (or,
  with ``_transactional=True``, both join the caller's transaction). The planning task splits
  the query's key range into ``shards`` ranges: from a sample of the kind ordered by
  Datastore's ``__scatter__`` property when the Datastore keeps it (production does) and the
  query has no ancestor, else from the query's keys read keys-only (exact quantiles, at most
  :data:`PLAN_SCAN_LIMIT` keys; past that the last shard takes the rest). Neither emulator
  keeps ``__scatter__``; ``benchmarks/iteration.py`` measures both ways.
- **Shards.** Each shard is a chain of tasks. A task reads ``batch_size`` entities at a time
  (the query plus ``__key__`` bounds, in key order), calls ``fn``, and commits the shard's
  progress (the last key done, counts) in a transaction; after ``time_budget`` seconds it
  defers the next task of the chain in that same transaction (``defer(_transactional=True)``,
  so the sweeper re-creates a link lost after the commit) and returns.
- **Guarantee: at least once per entity.** A task that dies mid-batch leaves the shard at its
  last committed key; the retry (or the next delivery) runs the rest of that batch again, so
  ``fn`` may see an entity twice. :func:`once_per_entity` makes a Datastore-writing ``fn``
  effectively once: it re-reads the entities, skips those already marked for this job, and
  commits the markers with ``fn``'s writes in one transaction.
- **Errors.** When ``fn`` raises, the progress before the failing entity is committed and the
  task fails, so Cloud Tasks retries it per queue.yaml (the job's queue). On the attempt
  Cloud Tasks would not retry (``task_retry_limit``/``task_age_limit`` reached) — or at once
  for :class:`~gae_deferred.PermanentTaskFailure` — the entity is recorded
  (``_DeferredJobFailure``: key, exception, traceback) and skipped, and the shard goes on in a
  fresh task. With ``batched=True`` that last attempt calls ``fn`` one entity at a time to
  find the entities that fail. A queue with no retry limit retries a failing entity until it
  is fixed or the job is cancelled, as it would any task.
- **Finalize exactly once.** A shard's last commit adds one to the job's ``shards_done`` in the
  same transaction; the commit that makes it equal to the number of shards also defers the
  finalize task (transactionally), so exactly one shard enqueues it, however many finish at
  once. ``finalize(totals)`` gets a :class:`JobTotals`; its task retries per queue.yaml and
  marks the job ``done`` (``finalize_state`` ``ok``, or ``failed`` with the error after the
  last attempt). A repeat delivery after it succeeded does nothing.
- **Control.** :func:`pause_job` stops every shard after the batch it is in; :func:`resume_job`
  starts each unfinished shard again from its last committed key; :func:`cancel_job` stops
  them for good (no finalize). A task of a chain that was paused and resumed in the meantime
  sees a newer chain number and stops, so a shard never runs twice at once.

Queries: a kind, with equality filters, an ancestor and a namespace; inequality filters,
``OR``/``IN``/``!=``, sort orders and projections are refused (they cannot be combined with the
``__key__`` ranges that shard the query).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import hashlib
import logging
import secrets
import time
import traceback as traceback_module
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from google.cloud import ndb

from . import _ndb_rpc, envelope
from ._config import settings
from ._datastore import ndb_context
from ._model import MAX_INDEXED_CHARS, DeferredModel
from .cloud_tasks import QUEUE_NAME
from .context import current_task
from .enqueue import defer
from .errors import DeferError, PermanentTaskFailure, QueueNotFoundError
from .execution import _queue_retry_limits, is_last_attempt
from .idempotency import DeferredDone

logger = logging.getLogger("gae_deferred")

#: Default number of shards, entities per batch, and seconds a task works before handing over.
DEFAULT_SHARDS = 8
DEFAULT_BATCH_SIZE = 100
#: Well under App Engine's 10-minute deadline for task requests.
DEFAULT_TIME_BUDGET = 180.0
MAX_SHARDS = 100
MAX_BATCH_SIZE = 1000
#: ``__scatter__`` samples per shard the planner asks for: on Google's legacy Datastore
#: emulator (which keeps ``__scatter__``), 8 shards of 10,000 entities came out at most 1.24x
#: the mean with 32 per shard, 1.08x with 128 (docs/backfills.md).
SCATTER_OVERSAMPLE = 128
#: The planner reads at most this many keys when the Datastore has no ``__scatter__``.
PLAN_SCAN_LIMIT = 100_000
#: A job's pickled query and functions live in its record: an entity holds at most 1 MiB.
MAX_SPEC_BYTES = 900_000
#: Entities one once_per_entity() call takes: with their markers, one commit of at most 500
#: writes (Datastore's limit per Commit).
ONCE_MAX_BATCH = 250
#: Where a job's records (and once_per_entity's markers) are kept, whatever namespace the
#: caller's context is in: the default namespace, with gae_deferred's other records.
RECORDS_NAMESPACE = ""
#: Transaction retries for the commits that shards make at once (the job's counter).
_TRANSACTION_RETRIES = 10


class JobState:
    """The states of a job (one vocabulary with the dashboard)."""

    PLANNING = "planning"
    RUNNING = "running"
    PAUSED = "paused"
    FINALIZING = "finalizing"
    DONE = "done"
    CANCELLED = "cancelled"

    ALL = (PLANNING, RUNNING, PAUSED, FINALIZING, DONE, CANCELLED)
    #: States a job no longer leaves.
    FINAL = (DONE, CANCELLED)


class DeferredJob(DeferredModel):
    """One iterate() job (kind ``_DeferredJob``, id: the job id)."""

    name = ndb.StringProperty()
    function = ndb.StringProperty()
    entity_kind = ndb.StringProperty()
    query_text = ndb.TextProperty()
    queue = ndb.StringProperty()
    state = ndb.StringProperty(choices=list(JobState.ALL))
    batched = ndb.BooleanProperty(indexed=False, default=False)
    batch_size = ndb.IntegerProperty(indexed=False)
    time_budget = ndb.FloatProperty(indexed=False)
    shards_requested = ndb.IntegerProperty(indexed=False)
    #: Shards planned (0 while planning), and how many have finished their range.
    shards = ndb.IntegerProperty(indexed=False, default=0)
    shards_done = ndb.IntegerProperty(indexed=False, default=0)
    #: How the key range was split: "scatter" or "keys" (and how many keys it looked at).
    sharding = ndb.TextProperty()
    sample_size = ndb.IntegerProperty(indexed=False, default=0)
    #: The entities the query matched when planned, where the planner did not read every key:
    #: a COUNT aggregation's answer (None where the Datastore cannot count).
    counted = ndb.IntegerProperty(indexed=False)
    created = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    started = ndb.DateTimeProperty(tzinfo=datetime.UTC, indexed=False)
    finished = ndb.DateTimeProperty(tzinfo=datetime.UTC, indexed=False)
    finalize_function = ndb.TextProperty()
    #: None (no finalize), "pending", "ok" or "failed".
    finalize_state = ndb.TextProperty()
    finalize_error = ndb.TextProperty()
    #: Totals written when the job ends (the dashboard sums the shards before that).
    processed = ndb.IntegerProperty(indexed=False, default=0)
    failed = ndb.IntegerProperty(indexed=False, default=0)
    #: The query, fn and finalize: a signed envelope (verified before it is unpickled).
    spec = ndb.BlobProperty()
    #: When the sweeper deletes the ended job, its shards, skipped-entity records and
    #: once_per_entity markers: ``finished`` + ``dead_letter_retention_seconds``.
    purge_at = ndb.DateTimeProperty(tzinfo=datetime.UTC)

    @property
    def id(self) -> str:
        return self.key.id()

    def _pre_put_hook(self) -> None:
        # Every write of an ended job passes here, whichever of done/finalize/cancel ended it.
        if self.state in JobState.FINAL and self.finished and self.purge_at is None:
            retention = datetime.timedelta(seconds=settings().dead_letter_retention_seconds)
            self.purge_at = self.finished + retention


class DeferredJobShard(DeferredModel):
    """One shard of a job (id ``<job id>-<index>``): its key range and committed progress."""

    job = ndb.StringProperty()
    index = ndb.IntegerProperty(indexed=False)
    #: The range: start (inclusive) and end (exclusive); None for an open end.
    start = ndb.KeyProperty(indexed=False)
    end = ndb.KeyProperty(indexed=False)
    #: The last key whose entity is done (processed or skipped): the next batch starts after it.
    last = ndb.KeyProperty(indexed=False)
    #: Where the next batch starts: the query cursor after ``last`` (None after a batch that
    #: stopped mid-way), and the key bound of the query that cursor belongs to.
    cursor = ndb.BlobProperty()
    cursor_after = ndb.KeyProperty(indexed=False)
    #: The chain number: a task carries the number it was deferred with and stops on another.
    chain = ndb.IntegerProperty(indexed=False, default=1)
    done = ndb.BooleanProperty(indexed=False, default=False)
    processed = ndb.IntegerProperty(indexed=False, default=0)
    failed = ndb.IntegerProperty(indexed=False, default=0)
    batches = ndb.IntegerProperty(indexed=False, default=0)
    tasks = ndb.IntegerProperty(indexed=False, default=0)
    updated = ndb.DateTimeProperty(tzinfo=datetime.UTC, indexed=False)


class DeferredJobFailure(DeferredModel):
    """An entity a job skipped after its last attempt (id ``<job id>-<hash of the key>``)."""

    job = ndb.StringProperty()
    entity = ndb.KeyProperty(indexed=False)
    shard = ndb.IntegerProperty(indexed=False)
    exception_type = ndb.TextProperty()
    message = ndb.TextProperty()
    traceback = ndb.TextProperty()
    attempts = ndb.IntegerProperty(indexed=False)
    at = ndb.DateTimeProperty(tzinfo=datetime.UTC)


@dataclasses.dataclass(frozen=True)
class JobTotals:
    """What ``finalize`` receives: the job's counts once every shard is done."""

    job_id: str
    name: str
    processed: int
    failed: int
    shards: int
    started: datetime.datetime | None
    finished: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Job:
    """What iterate() returns: the job's id (its dashboard page is ``jobs/<id>``)."""

    id: str
    name: str
    queue: str
    transactional: bool = False


@dataclasses.dataclass(frozen=True)
class _Spec:
    query: ndb.Query
    fn: Callable
    finalize: Callable | None


_current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gae_deferred_job", default=None
)


def current_job() -> str | None:
    """The id of the job whose ``fn`` or ``finalize`` is running, else None."""
    return _current_job.get()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- starting a job ----------------------------------------------------------------------------


def iterate(
    query: ndb.Query,
    fn: Callable[[Any], Any],
    *,
    shards: int = DEFAULT_SHARDS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batched: bool = False,
    finalize: Callable[[JobTotals], Any] | None = None,
    queue: str | None = None,
    name: str | None = None,
    time_budget: float = DEFAULT_TIME_BUDGET,
    _transactional: bool = False,
) -> Job:
    """Run ``fn`` over every entity of ``query`` in ``shards`` chains of tasks; returns the Job.

    ``fn(entity)`` is called per entity, or ``fn(batch)`` with a list of up to ``batch_size``
    entities when ``batched=True``. ``finalize(totals)`` runs once after every shard is done.
    ``queue`` (default: the configured default queue) runs every task of the job and gives the
    retry limits; ``name`` labels the job on the dashboard; ``time_budget`` is how many seconds
    one task works before the next one takes over. ``_transactional=True`` starts the job only
    if the surrounding ndb transaction commits, as for defer().
    """
    kind = _check_query(query)
    query = _in_callers_namespace(query)
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if finalize is not None and not callable(finalize):
        raise TypeError(f"finalize must be callable or None, not {type(finalize).__name__}")
    _check_int("shards", shards, 1, MAX_SHARDS)
    _check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    if isinstance(time_budget, bool) or not isinstance(time_budget, int | float):
        raise TypeError("time_budget must be a number of seconds")
    if not 0 < time_budget <= 540:
        raise ValueError(f"time_budget must be in (0, 540] seconds, not {time_budget!r}")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 200):
        raise ValueError("name must be a string of 1 to 200 characters")
    if not isinstance(batched, bool):
        raise TypeError("batched must be True or False")
    if queue is not None and not QUEUE_NAME.match(queue):
        raise ValueError(f"invalid queue name {queue!r}")
    spec = envelope.serialize(_spec_of, _Spec(query, fn, finalize))
    if len(spec) > MAX_SPEC_BYTES:
        raise DeferError(
            f"the query, fn and finalize pickle to {len(spec):,} bytes; a job keeps at most "
            f"{MAX_SPEC_BYTES:,} (pass ids, not data, in closures)"
        )
    current = settings()
    job_queue = queue or current.default_queue
    if current.queue_yaml:
        known = _queue_retry_limits(current.queue_yaml)
        if known and job_queue not in known:
            # Its tasks are created after a commit, where Cloud Tasks' refusal would be lost.
            raise QueueNotFoundError(f"queue {job_queue!r} is not in {current.queue_yaml}")
    job_id = f"j{int(time.time()):x}{secrets.token_hex(6)}"
    function = envelope.function_name(fn)
    record = DeferredJob(
        key=_job_key(job_id),
        name=(name or function)[:MAX_INDEXED_CHARS],
        function=function[:MAX_INDEXED_CHARS],
        entity_kind=kind,
        query_text=repr(query)[:2000],
        queue=job_queue,
        state=JobState.PLANNING,
        batched=batched,
        batch_size=batch_size,
        time_budget=float(time_budget),
        shards_requested=shards,
        created=_now(),
        finalize_function=envelope.function_name(finalize) if finalize else None,
        finalize_state="pending" if finalize else None,
        spec=spec,
    )

    def start() -> None:
        record.put()
        _defer(_plan_job, job_id, job_queue, name=f"{job_id}-plan")

    with ndb_context(), _in_records_namespace():
        if _transactional:
            context = ndb.get_context()
            if not context.in_transaction():
                raise DeferError("_transactional=True needs an active ndb transaction")
            start()
        else:
            # Independent of a surrounding transaction, as defer() is.
            ndb.non_transactional()(ndb.transaction)(start, retries=_TRANSACTION_RETRIES)
    return Job(id=job_id, name=record.name, queue=job_queue, transactional=_transactional)


def _spec_of(spec: _Spec) -> _Spec:
    return spec


@contextlib.contextmanager
def _in_records_namespace() -> Iterator[None]:
    """The current ndb context (its transaction too) with RECORDS_NAMESPACE as its namespace:
    the job's records, and the payloads of the tasks it defers, are written there."""
    context = ndb.get_context()
    if (context.get_namespace() or "") == RECORDS_NAMESPACE:
        yield
        return
    with context.new(namespace=RECORDS_NAMESPACE).use():
        yield


def _in_callers_namespace(query: ndb.Query) -> ndb.Query:
    """``query`` with the namespace it would run in now: the job's tasks run it later, in
    contexts of their own."""
    if query.namespace is not None or query.ancestor is not None:
        return query
    context = ndb.get_context(raise_context_error=False)
    namespace = context.get_namespace() if context is not None else None
    if not namespace:
        return query
    return ndb.Query(
        kind=query.kind,
        filters=query.filters,
        namespace=namespace,
        project=query.project,
    )


def _check_int(label: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{label} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{label} must be between {low} and {high}, not {value}")


def _check_query(query: Any) -> str:
    """The query's kind; a clear error for what key ranges cannot shard."""
    if not isinstance(query, ndb.Query):
        raise TypeError(f"iterate() takes an ndb query (Model.query()), not {type(query).__name__}")
    if not query.kind:
        raise ValueError("iterate() needs a query of one kind (a kindless query has no key range)")
    if query.order_by:
        raise ValueError(
            f"iterate() walks a query in key order: remove its sort orders ({query.order_by!r})"
        )
    if query.projection or query.distinct_on:
        raise ValueError("iterate() hands whole entities to fn: remove the projection")
    if query.filters is not None:
        _check_filters(query.filters)
    return query.kind


def _check_filters(node: Any) -> None:
    if isinstance(node, ndb.query.ConjunctionNode):
        for child in node:
            _check_filters(child)
        return
    if isinstance(node, ndb.query.FilterNode) and node._opsymbol == "=":
        if node._name == "__key__":
            raise ValueError("iterate() shards by key: a __key__ filter cannot be combined")
        return
    raise ValueError(
        "iterate() can shard a query with equality filters only (key ranges cannot be combined "
        f"with inequality, !=, IN or OR filters): {node!r}"
    )


# -- the tasks ---------------------------------------------------------------------------------


def _defer(func: Callable, *args: Any, name: str) -> None:
    """Defer one task of a job inside the current transaction (the sweeper re-creates it if
    the process dies between the commit and CreateTask). ``args[1]`` is the queue."""
    defer(func, *args, _queue=args[1], _name=name, _transactional=True)


def _load(job_id: str) -> tuple[DeferredJob | None, _Spec | None]:
    job = _job_key(job_id).get()
    return job, _spec(job)


def _spec(job: DeferredJob | None) -> _Spec | None:
    """The job's query, fn and finalize, once their envelope's signature verifies."""
    if job is None:
        return None
    _, args, _ = envelope.load_call(envelope.open_envelope(job.spec))
    return args[0]


def _job_key(job_id: str) -> ndb.Key:
    return ndb.Key(DeferredJob, job_id, namespace=RECORDS_NAMESPACE)


def _shard_key(job_id: str, index: int) -> ndb.Key:
    return ndb.Key(DeferredJobShard, f"{job_id}-{index}", namespace=RECORDS_NAMESPACE)


def _shard_task_name(job_id: str, index: int, chain: int) -> str:
    return f"{job_id}-s{index}-c{chain}"


def _plan_job(job_id: str, queue: str) -> None:
    """The planning task: split the key range, write the shards, start their chains."""
    job, spec = _load(job_id)
    if job is None or job.state != JobState.PLANNING:
        return
    splits, sharding, sample_size = plan_splits(spec.query, job.shards_requested)
    # Reading every key counted them; a sample or a single shard did not: the dashboard's ETA.
    counted = None if read_every_key(sharding, sample_size) else _ndb_rpc.count(spec.query)
    bounds = [None, *splits, None]
    count = len(bounds) - 1

    def start() -> None:
        current = _job_key(job_id).get()
        if current is None or current.state != JobState.PLANNING:
            return
        now = _now()
        shards = [
            DeferredJobShard(
                key=_shard_key(job_id, index),
                job=job_id,
                index=index,
                start=bounds[index],
                end=bounds[index + 1],
                updated=now,
            )
            for index in range(count)
        ]
        current.shards = count
        current.sharding = sharding
        current.sample_size = sample_size
        current.counted = counted
        current.started = now
        current.state = JobState.RUNNING
        ndb.put_multi([current, *shards])
        for index in range(count):
            _defer(_run_shard, job_id, queue, index, 1, name=_shard_task_name(job_id, index, 1))

    ndb.transaction(start, retries=_TRANSACTION_RETRIES)


def plan_splits(query: ndb.Query, shards: int) -> tuple[list[ndb.Key], str, int]:
    """Split points (shards - 1 keys at most, ascending) for ``query``'s key range, how they
    were found ("scatter" or "keys"), and how many keys were looked at."""
    if shards <= 1:
        return [], "single", 0
    if query.ancestor is None:
        # A kind-wide sample (an ancestor's would need a composite index on __scatter__).
        base = ndb.Query(kind=query.kind, namespace=query.namespace, project=query.project)
        sample = base.order(ndb.query.PropertyOrder("__scatter__")).fetch(
            shards * SCATTER_OVERSAMPLE, keys_only=True
        )
        if len(sample) >= shards:
            return _quantiles(sorted(sample), shards), "scatter", len(sample)
    keys = _keyed(query).fetch(PLAN_SCAN_LIMIT, keys_only=True)
    return _quantiles(keys, shards), "keys", len(keys)


def read_every_key(sharding: str | None, sample_size: int | None) -> bool:
    """Whether the planner read every key of the query (so ``sample_size`` is its count)."""
    return sharding == "keys" and (sample_size or 0) < PLAN_SCAN_LIMIT


def _quantiles(keys: Sequence[ndb.Key], shards: int) -> list[ndb.Key]:
    """The keys that cut ``keys`` (ascending) into ``shards`` runs of (nearly) equal length."""
    cuts = []
    for index in range(1, shards):
        position = index * len(keys) // shards
        if 0 < position < len(keys) and (not cuts or keys[position] != cuts[-1]):
            cuts.append(keys[position])
    return cuts


def _keyed(
    query: ndb.Query, after: ndb.Key | None = None, start: ndb.Key | None = None, end: Any = None
) -> ndb.Query:
    """``query`` in key order, within the bounds: (after or start, end)."""
    filters = [query.filters] if query.filters is not None else []
    if after is not None:
        filters.append(ndb.query.FilterNode("__key__", ">", after))
    elif start is not None:
        filters.append(ndb.query.FilterNode("__key__", ">=", start))
    if end is not None:
        filters.append(ndb.query.FilterNode("__key__", "<", end))
    combined = None
    if len(filters) == 1:
        combined = filters[0]
    elif filters:
        combined = ndb.AND(*filters)
    return ndb.Query(
        kind=query.kind,
        ancestor=query.ancestor,
        namespace=query.namespace,
        project=query.project,
        filters=combined,
        order_by=[ndb.query.PropertyOrder("__key__")],
    )


@dataclasses.dataclass
class _Progress:
    """What one task did since its last commit."""

    last: ndb.Key | None = None
    #: The cursor after ``last`` when the whole batch is done, and its query's key bound.
    cursor: bytes | None = None
    cursor_after: ndb.Key | None = None
    processed: int = 0
    failures: list[DeferredJobFailure] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return self.last is not None


class _Stop(Exception):
    """The shard's chain ends here (paused, cancelled, superseded, finished)."""


def _run_shard(job_id: str, queue: str, index: int, chain: int) -> None:
    """One task of a shard's chain: batches until the time budget, then the next task."""
    job, shard = ndb.get_multi([_job_key(job_id), _shard_key(job_id, index)])
    if job is None or shard is None or shard.done or shard.chain != chain:
        return
    if job.state != JobState.RUNNING:
        return
    spec = _spec(job)
    task = current_task()
    deadline = time.monotonic() + job.time_budget
    last_attempt = _is_last_attempt(task)
    token = _current_job.set(job_id)
    try:
        _shard_loop(job, spec, shard, queue, deadline, last_attempt)
    except _Stop:
        return
    finally:
        _current_job.reset(token)


def _is_last_attempt(task: Any) -> bool:
    if task is None:
        return False
    header = {"eta_ms": int(task.eta * 1000)} if task.eta is not None else {}
    return is_last_attempt(task, header)


def _shard_loop(
    job: DeferredJob,
    spec: _Spec,
    shard: DeferredJobShard,
    queue: str,
    deadline: float,
    last_attempt: bool,
) -> None:
    # A cursor continues its query where it stopped (an index seek); a key bound alone makes
    # Datastore skip to the key first.
    after, cursor = (shard.cursor_after, shard.cursor) if shard.cursor else (shard.last, None)
    while True:
        query = _keyed(spec.query, after=after, start=shard.start, end=shard.end)
        start_cursor = ndb.Cursor(urlsafe=cursor) if cursor else None
        batch, next_cursor, _ = query.fetch_page(job.batch_size, start_cursor=start_cursor)
        progress = _Progress()
        error, whole = _process(job, spec, shard, batch, progress, last_attempt)
        if whole and next_cursor is not None:
            progress.cursor, progress.cursor_after = next_cursor.urlsafe(), after
        if error is not None:
            # The entities before the failing one stay done; Cloud Tasks retries the rest.
            if progress:
                _commit(job, shard, queue, progress, finished=False, hand_over=False)
            raise error
        done = whole and len(batch) < job.batch_size
        # A skipped entity used up this task's last attempt: the rest of the shard goes on in
        # a fresh task, with Cloud Tasks' full retries.
        hand_over = not done and (bool(progress.failures) or time.monotonic() >= deadline)
        _commit(job, shard, queue, progress, finished=done, hand_over=hand_over)
        if done or hand_over:
            return
        if progress.cursor is not None:
            cursor = progress.cursor
        else:
            after, cursor = progress.last, None


def _process(
    job: DeferredJob,
    spec: _Spec,
    shard: DeferredJobShard,
    batch: list[Any],
    progress: _Progress,
    last_attempt: bool,
) -> tuple[Exception | None, bool]:
    """Call fn over ``batch``, advancing ``progress``. Returns the exception to retry the task
    with (``progress`` holds the entities before it), and whether the whole batch is done.

    On the last attempt (or for PermanentTaskFailure) a failing entity is recorded in
    ``progress.failures`` and skipped: per entity, the batch stops after it; batched, fn is
    called once per entity of the batch to find the failing ones.
    """
    if not batch:
        return None, True
    if job.batched:
        try:
            spec.fn(batch)
        except Exception as exc:
            if not (last_attempt or isinstance(exc, PermanentTaskFailure)):
                return exc, False
            # Fresh copies: the failed call may have changed the entities it was given.
            fresh = ndb.get_multi([_key_of(entity) for entity in batch], use_cache=False)
            for entity, copy in zip(batch, fresh, strict=True):
                if copy is None:
                    progress.last = _key_of(entity)
                    continue
                try:
                    spec.fn([copy])
                    progress.processed += 1
                except Exception as single:
                    progress.failures.append(_failure(job, shard, entity, single))
                progress.last = _key_of(entity)
            return None, True
        progress.processed += len(batch)
        progress.last = _key_of(batch[-1])
        return None, True
    for position, entity in enumerate(batch):
        try:
            spec.fn(entity)
        except Exception as exc:
            if not (last_attempt or isinstance(exc, PermanentTaskFailure)):
                return exc, False
            progress.failures.append(_failure(job, shard, entity, exc))
            progress.last = _key_of(entity)
            return None, position == len(batch) - 1
        progress.processed += 1
        progress.last = _key_of(entity)
    return None, True


def _key_of(entity: Any) -> ndb.Key:
    return entity if isinstance(entity, ndb.Key) else entity.key


def _failure(
    job: DeferredJob, shard: DeferredJobShard, entity: Any, exc: BaseException
) -> DeferredJobFailure:
    key = _key_of(entity)
    digest = hashlib.sha256(key.to_legacy_urlsafe(location_prefix="s~")).hexdigest()[:32]
    task = current_task()
    logger.warning("job %s skips %r after its last attempt: %r", job.id, key, exc)
    return DeferredJobFailure(
        key=ndb.Key(DeferredJobFailure, f"{job.id}-{digest}", namespace=RECORDS_NAMESPACE),
        job=job.id,
        entity=key,
        shard=shard.index,
        exception_type=type(exc).__name__[:MAX_INDEXED_CHARS],
        message=str(exc)[:10_000],
        traceback="".join(traceback_module.format_exception(exc))[-20_000:],
        attempts=(task.retry_count + 1) if task is not None else 1,
        at=_now(),
    )


def _commit(
    job: DeferredJob,
    shard: DeferredJobShard,
    queue: str,
    progress: _Progress,
    *,
    finished: bool,
    hand_over: bool,
) -> None:
    """Commit the shard's progress in a transaction, with the next task of the chain
    (``hand_over``) or the shard's end (``finished``: the job's counter, maybe finalize).
    Raises _Stop when the chain must not go on."""
    job_key = job.key
    shard_key = shard.key

    # The job's state is read outside the transaction: a batch commit then locks its shard
    # only, not the job every shard shares (Datastore locks what a transaction reads). The
    # job is read inside only where it is written: a shard's end, or a cancelled job's totals.
    seen = job_key.get()
    if seen is None:
        raise _Stop

    def commit() -> bool:
        if finished or (seen.state == JobState.CANCELLED and progress):
            current_job, current = ndb.get_multi([job_key, shard_key])
        else:
            current_job, current = seen, shard_key.get()
        if current_job is None or current is None or current.done or current.chain != shard.chain:
            return False
        if progress:
            current.last = progress.last
            current.cursor = progress.cursor
            current.cursor_after = progress.cursor_after
            current.processed += progress.processed
            current.failed += len(progress.failures)
            current.batches += 1
        current.updated = _now()
        writes: list[ndb.Model] = [current, *progress.failures]
        going_on = current_job.state == JobState.RUNNING
        job_changed = finished
        if current_job.state == JobState.CANCELLED and progress:
            # The job's totals were taken when it was cancelled; this batch was under way.
            _store_totals(current_job, current)
            job_changed = True
        if finished:
            current.done = True
            current_job.shards_done += 1
            if current_job.shards_done >= current_job.shards:
                _end_of_shards(current_job, queue, current)
        if job_changed:
            writes.append(current_job)
        elif hand_over and going_on:
            current.chain += 1
            current.tasks += 1
            _defer(
                _run_shard,
                job_key.id(),
                queue,
                current.index,
                current.chain,
                name=_shard_task_name(job_key.id(), current.index, current.chain),
            )
        ndb.put_multi(writes)
        shard.last = current.last
        shard.chain = current.chain
        return going_on

    going_on = ndb.transaction(commit, retries=_TRANSACTION_RETRIES)
    if not going_on and not finished:
        raise _Stop


def _end_of_shards(job: DeferredJob, queue: str, last: DeferredJobShard) -> None:
    """Every shard is done (inside the commit of the last one): finalize, or the job is done."""
    if job.state == JobState.CANCELLED:
        return
    if job.finalize_state == "pending":
        job.state = JobState.FINALIZING
        _defer(_run_finalize, job.id, queue, name=f"{job.id}-finalize")
        return
    job.state = JobState.DONE
    job.finished = _now()
    _store_totals(job, last)


def _shards_of(job: DeferredJob) -> list[DeferredJobShard]:
    """The job's shards, read by key (strongly consistent)."""
    if not job.shards:
        return []
    return [
        shard
        for shard in ndb.get_multi([_shard_key(job.id, index) for index in range(job.shards)])
        if shard is not None
    ]


def _store_totals(job: DeferredJob, updated: DeferredJobShard | None = None) -> None:
    """The job's totals from its shards (``updated``: a shard written in this transaction,
    which a read inside it would see as it was)."""
    shards = [
        updated if updated is not None and shard.key == updated.key else shard
        for shard in _shards_of(job)
    ]
    job.processed = sum(shard.processed for shard in shards)
    job.failed = sum(shard.failed for shard in shards)


def _run_finalize(job_id: str, queue: str) -> None:
    """The finalize task: once every shard is done; retried per queue.yaml."""
    job, spec = _load(job_id)
    if job is None or job.state != JobState.FINALIZING or job.finalize_state != "pending":
        return
    finished = _now()
    shards = _shards_of(job)
    totals = JobTotals(
        job_id=job_id,
        name=job.name,
        processed=sum(shard.processed for shard in shards),
        failed=sum(shard.failed for shard in shards),
        shards=job.shards,
        started=job.started,
        finished=finished,
    )
    token = _current_job.set(job_id)
    try:
        spec.finalize(totals)
        outcome, error = "ok", None
    except Exception as exc:
        if not (_is_last_attempt(current_task()) or isinstance(exc, PermanentTaskFailure)):
            raise
        outcome, error = "failed", "".join(traceback_module.format_exception(exc))[-20_000:]
    finally:
        _current_job.reset(token)

    def done() -> None:
        current = _job_key(job_id).get()
        if current is None or current.finalize_state != "pending":
            return
        current.state = JobState.DONE
        current.finalize_state = outcome
        current.finalize_error = error
        current.finished = finished
        current.processed = totals.processed
        current.failed = totals.failed
        current.put()

    ndb.transaction(done, retries=_TRANSACTION_RETRIES)


# -- control -----------------------------------------------------------------------------------


def pause_job(job_id: str) -> DeferredJob:
    """Stop every shard after the batch it is in; :func:`resume_job` goes on from there."""

    def pause(job: DeferredJob) -> None:
        if job.state != JobState.RUNNING:
            raise DeferError(f"job {job_id} is {job.state}: only a running job can be paused")
        job.state = JobState.PAUSED

    return _change(job_id, pause)


def resume_job(job_id: str) -> DeferredJob:
    """Start every unfinished shard of a paused job again from its last committed key."""

    def resume(job: DeferredJob) -> None:
        if job.state != JobState.PAUSED:
            raise DeferError(f"job {job_id} is {job.state}: only a paused job can be resumed")
        job.state = JobState.RUNNING
        shards = [shard for shard in _shards_of(job) if not shard.done]
        for shard in shards:
            shard.chain += 1
            shard.tasks += 1
            shard.updated = _now()
            _defer(
                _run_shard,
                job_id,
                job.queue,
                shard.index,
                shard.chain,
                name=_shard_task_name(job_id, shard.index, shard.chain),
            )
        ndb.put_multi(shards)

    return _change(job_id, resume)


def cancel_job(job_id: str) -> DeferredJob:
    """Stop every shard for good; finalize does not run. A job that is finalizing (every shard
    done) can no longer be cancelled."""

    def cancel(job: DeferredJob) -> None:
        if job.state in JobState.FINAL:
            raise DeferError(f"job {job_id} is already {job.state}")
        if job.state == JobState.FINALIZING:
            raise DeferError(f"job {job_id} is finalizing: every shard is done")
        job.state = JobState.CANCELLED
        job.finished = _now()
        if job.finalize_state == "pending":
            job.finalize_state = "cancelled"
        _store_totals(job)

    return _change(job_id, cancel)


def _change(job_id: str, change: Callable[[DeferredJob], None]) -> DeferredJob:
    def apply() -> DeferredJob:
        job = _job_key(job_id).get()
        if job is None:
            raise KeyError(job_id)
        change(job)
        job.put()
        return job

    with ndb_context(), _in_records_namespace():
        return ndb.transaction(apply, retries=_TRANSACTION_RETRIES)


# -- reading -----------------------------------------------------------------------------------


def get_job(job_id: str) -> DeferredJob | None:
    with ndb_context():
        return _job_key(job_id).get()


def job_shards(job_id: str) -> list[DeferredJobShard]:
    """A job's shards, in order."""
    with ndb_context():
        job = _job_key(job_id).get()
        return _shards_of(job) if job is not None else []


def job_failures(job_id: str, limit: int = 100) -> list[DeferredJobFailure]:
    """The entities a job skipped, newest first."""
    with ndb_context():
        query = DeferredJobFailure.query(
            DeferredJobFailure.job == job_id, namespace=RECORDS_NAMESPACE
        ).order(-DeferredJobFailure.at)
        return query.fetch(limit)


# -- making fn idempotent ----------------------------------------------------------------------


def once_per_entity(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Make a Datastore-writing ``fn`` take effect once per entity and job, despite repeats.

    The wrapper runs in a transaction: it re-reads the entities (``fn`` gets fresh copies;
    entities deleted meanwhile are left out), skips those already marked done for this job,
    calls ``fn`` with the rest — one entity, or a list when the job is ``batched`` — and
    commits a ``_DeferredDone`` marker per entity together with ``fn``'s own writes. A batch
    and its markers share one commit: at most :data:`ONCE_MAX_BATCH` entities a call. Works
    only inside an iterate() job.
    """

    def wrapper(arg: Any) -> Any:
        job_id = current_job()
        if job_id is None:
            raise DeferError("once_per_entity() functions run inside an iterate() job")
        batched = isinstance(arg, list)
        keys = [_key_of(item) for item in (arg if batched else [arg])]
        if len(keys) > ONCE_MAX_BATCH:
            raise DeferError(
                f"once_per_entity() takes at most {ONCE_MAX_BATCH} entities a call (a batch and "
                f"its markers share one commit of at most 500 writes), not {len(keys)}: "
                "lower the job's batch_size"
            )
        markers = [
            ndb.Key(DeferredDone, f"{job_id}:{_marker_id(key)}", namespace=RECORDS_NAMESPACE)
            for key in keys
        ]

        def apply() -> Any:
            found = ndb.get_multi([*markers, *keys], use_cache=False)
            done, fresh = found[: len(keys)], found[len(keys) :]
            todo = [
                (entity, marker)
                for entity, marker, seen in zip(fresh, markers, done, strict=True)
                if seen is None and entity is not None
            ]
            if not todo:
                return None
            entities = [entity for entity, _ in todo]
            result = fn(entities if batched else entities[0])
            now = _now()
            name = envelope.function_name(fn)
            ndb.put_multi([DeferredDone(key=marker, done=now, function=name) for _, marker in todo])
            return result

        return ndb.transaction(apply, retries=_TRANSACTION_RETRIES)

    wrapper.__name__ = getattr(fn, "__name__", "once_per_entity")
    wrapper.__qualname__ = getattr(fn, "__qualname__", wrapper.__name__)
    wrapper.__module__ = getattr(fn, "__module__", __name__)
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _marker_id(key: ndb.Key) -> str:
    return hashlib.sha256(key.to_legacy_urlsafe(location_prefix="s~")).hexdigest()


# -- purge -------------------------------------------------------------------------------------

#: Jobs one sweep purges at most (each of at most ``batch`` records).
PURGE_JOBS_PER_SWEEP = 2
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def purge_ended_jobs(now: datetime.datetime, batch: int) -> tuple[int, int]:
    """The sweeper's part: jobs past their ``purge_at`` are deleted with their records, at most
    ``batch`` records a job per sweep (once_per_entity markers first, the job record last, so
    a job half purged is found again). Returns (jobs deleted, records deleted)."""
    jobs_gone = records = 0
    with _in_records_namespace():
        # Two bounds: an unended job's purge_at is null, which sorts before every date.
        ended = DeferredJob.query(DeferredJob.purge_at > _EPOCH, DeferredJob.purge_at <= now)
        for job in ended.fetch(PURGE_JOBS_PER_SWEEP):
            doomed = _job_records(job.id, batch)
            if len(doomed) < batch:
                doomed.append(job.key)
                jobs_gone += 1
            ndb.delete_multi(doomed)
            records += len(doomed)
    return jobs_gone, records


def _job_records(job_id: str, limit: int) -> list[ndb.Key]:
    """Up to ``limit`` keys of the job's markers, skipped-entity records and shards."""
    first = ndb.Key(DeferredDone, f"{job_id}:", namespace=RECORDS_NAMESPACE)
    past = ndb.Key(DeferredDone, f"{job_id};", namespace=RECORDS_NAMESPACE)  # ";" follows ":"
    queries = [
        DeferredDone.query(DeferredDone.key >= first, DeferredDone.key < past),
        DeferredJobFailure.query(DeferredJobFailure.job == job_id),
        DeferredJobShard.query(DeferredJobShard.job == job_id),
    ]
    keys: list[ndb.Key] = []
    for query in queries:
        if len(keys) < limit:
            keys += query.fetch(limit - len(keys), keys_only=True)
    return keys
