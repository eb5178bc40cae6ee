"""Execution metrics: runs, successes, failures, retries and durations per function and queue.

The task path calls :func:`observe` once per task: one append to a queue in memory, no lock.
The flush thread (or an observe() that finds ``_DRAIN_AT`` runs waiting) adds them up per
minute, with durations in fixed histogram buckets (:data:`BUCKETS_MS`) so percentiles of
several processes merge exactly (reported as the upper bound of the bucket they fall in, or the
exact maximum when that is lower). A background thread flushes the totals every
``settings().metrics_flush_seconds`` (default 60; the first run after a quiet interval
``metrics_first_flush_seconds`` after it, 1 s by default) and at interpreter exit: **at most
one Datastore transaction per process per interval** that folds them into one
``_DeferredMetricSeries`` record per function, per queue and for all functions::

    from gae_deferred import metrics

    metrics.observe("reports.build", "reports", 0.120, ok=True, retried=False)
    metrics.flush()                                  # what the thread does every interval
    series = metrics.get_series("function", "reports.build")
    series.window("24h").p95_ms, series.by_minute()  # last hour, minute by minute

A record keeps the minutes of the last hour and the hours of the last 7 days; its window totals
(``runs_1h`` ... ``p95_7d``) are indexed so the dashboard lists functions a page at a time,
sorted by any of them. Windows: ``1h`` is the last 60 minutes, ``24h`` the current hour and the
23 before it, ``7d`` the current hour and the 167 before it. A crash loses what its process saw
since its last flush (at most one interval); records quiet for 8 days are purged by the
sweeper, which also refreshes window totals that aged without new runs (:func:`maintain`).
"""

from __future__ import annotations

import atexit
import bisect
import collections
import dataclasses
import datetime
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from google.cloud import ndb

from ._config import settings
from ._datastore import ndb_context
from ._model import MAX_INDEXED_CHARS, DeferredModel, root_key

logger = logging.getLogger("gae_deferred")

#: Upper bounds (ms) of the duration buckets; one more bucket holds anything slower.
BUCKETS_MS = (
    *(scale * step for scale in (1, 10, 100, 1000) for step in (1, 1.5, 2, 3, 5, 7.5)),
    10_000,
    15_000,
    20_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
)
WINDOWS = {"1h": 3600, "24h": 24 * 3600, "7d": 7 * 24 * 3600}
SORTS = ("runs", "failures", "p95")
KINDS = ("function", "queue", "all")
#: Series that ran nothing for this long are deleted by the sweeper.
RETENTION = datetime.timedelta(days=8)
#: Series read and written per transaction: a series is at most about 40 KB (an hour of
#: minutes and 7 days of hours, each slot a few numbers and the histogram), so 64 of them keep
#: the Lookup's response and the Commit's request under 4 MiB, the most Datastore takes
#: (tests/test_rpc_limits.py).
_BATCH = 64
# Slot layout: runs, successes, failures, retries, max ms, histogram (one count per bucket).
_RUNS, _OK, _FAILED, _RETRIES, _MAX, _HIST = range(6)
_HOUR_SLOTS = 7 * 24
_MINUTE_SLOTS = 60


def _empty_slot() -> list:
    return [0, 0, 0, 0, 0.0, [0] * (len(BUCKETS_MS) + 1)]


def _add(into: list, slot: list) -> None:
    for index in (_RUNS, _OK, _FAILED, _RETRIES):
        into[index] += slot[index]
    into[_MAX] = max(into[_MAX], slot[_MAX])
    hist = into[_HIST]
    for bucket, count in enumerate(slot[_HIST]):
        hist[bucket] += count


# -- recording (the task path) ------------------------------------------------------------


class _Recorder:
    """This process's runs since the last flush: ``runs`` as observe() appended them, and their
    totals once added up, (function, queue) -> minute -> slot."""

    def __init__(self) -> None:
        #: (function, queue, seconds, ok, retried, time.time()) per run. A deque's append
        #: and popleft are thread-safe, so observe() takes no lock.
        self.runs: collections.deque[tuple[str, str, float, bool, bool, float]] = (
            collections.deque()
        )
        #: Held while runs are added up into ``pending`` and while ``pending`` is taken.
        self.lock = threading.Lock()
        self.pending: dict[tuple[str, str], dict[int, list]] = {}
        self.flusher: threading.Thread | None = None
        self.flusher_pid = 0
        self.stop = threading.Event()
        #: Set by the first run observed since the last flush: the flusher writes it promptly.
        self.wake = threading.Event()
        self.exit_hook = False

    def add_up(self) -> None:
        """Move the runs observed so far into ``pending``'s totals."""
        with self.lock:
            self._add_up()

    def _add_up(self) -> None:
        runs, pending = self.runs, self.pending
        while True:
            try:
                function, queue, seconds, ok, retried, at = runs.popleft()
            except IndexError:
                return
            ms = seconds * 1000.0
            minutes = pending.get((function, queue))
            if minutes is None:
                minutes = pending[(function, queue)] = {}
            minute = int(at) // 60
            slot = minutes.get(minute)
            if slot is None:
                slot = minutes[minute] = _empty_slot()
            slot[_RUNS] += 1
            slot[_OK if ok else _FAILED] += 1
            if retried:
                slot[_RETRIES] += 1
            if ms > slot[_MAX]:
                slot[_MAX] = ms
            slot[_HIST][bisect.bisect_left(BUCKETS_MS, ms)] += 1

    def take(self) -> dict[tuple[str, str], dict[int, list]]:
        with self.lock:
            self._add_up()
            taken, self.pending = self.pending, {}
        return taken

    def give_back(self, taken: dict[tuple[str, str], dict[int, list]]) -> None:
        """A flush failed: keep its totals for the next one (unless they are past an hour)."""
        oldest = int(time.time()) // 60 - _MINUTE_SLOTS
        with self.lock:
            for key, minutes in taken.items():
                mine = self.pending.setdefault(key, {})
                for minute, slot in minutes.items():
                    if minute > oldest:
                        _add(mine.setdefault(minute, _empty_slot()), slot)


_recorder = _Recorder()
#: Runs waiting in the queue beyond which the observe() that finds them adds them up itself:
#: a bound on the queue's memory (about 2 MB) between flushes, at any rate of tasks.
_DRAIN_AT = 10_000
#: This process's id, kept current across fork(): observe() compares it on every task, and
#: os.getpid() is a system call each time.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def discard_pending() -> None:
    """Drop what this process counted but did not flush yet (tests, a process moving on)."""
    _recorder.take()


def observe(function: str, queue: str, seconds: float, *, ok: bool, retried: bool) -> None:
    """Count one task run: in memory only, no I/O (the flush thread writes later).

    ``ok`` for a success, ``retried`` when Cloud Tasks had run this task before.
    """
    current = settings()
    if not current.metrics_enabled:
        return
    recorder = _recorder
    runs = recorder.runs
    # Racy by design: two first runs both wake the flusher, which is harmless.
    first = not runs and not recorder.pending
    runs.append((function, queue, seconds, ok, retried, time.time()))
    if len(runs) >= _DRAIN_AT:
        recorder.add_up()
    if recorder.flusher_pid != _pid:
        _start_flusher(current.metrics_flush_seconds, current.metrics_first_flush_seconds)
    if first:
        recorder.wake.set()


def _start_flusher(interval: float, first_delay: float) -> None:
    recorder = _recorder
    with recorder.lock:
        # After a fork the child has the parent's totals' copy but no thread: start its own.
        if recorder.flusher_pid == os.getpid():
            return
        recorder.flusher_pid = os.getpid()
        recorder.stop = threading.Event()
        recorder.flusher = threading.Thread(
            target=_flush_every,
            args=(interval, first_delay, recorder.stop, recorder.wake),
            name="gae-deferred-metrics",
        )
        recorder.flusher.daemon = True
        recorder.flusher.start()
        if not recorder.exit_hook:
            # A clean shutdown (gunicorn's graceful stop, sys.exit) writes the last totals.
            atexit.register(_flush_at_exit)
            recorder.exit_hook = True


def _flush_every(
    interval: float, first_delay: float, stop: threading.Event, wake: threading.Event
) -> None:
    """Flush at most once per ``interval``; after a quiet interval, the first run observed is
    written ``first_delay`` later instead of up to ``interval`` later (so a dashboard does not
    show "nothing ran" for a minute while the failures a run recorded already show)."""
    prompt = first_delay < interval
    while not stop.is_set():
        if prompt:
            wake.wait(interval)
            if stop.wait(first_delay if wake.is_set() else 0):
                return
        elif stop.wait(interval):
            return
        wake.clear()
        flush()
        if prompt and stop.wait(interval):
            return


def _flush_at_exit() -> None:
    _recorder.stop.set()
    # Totals that cannot be written now are lost whatever we log: what a crash loses anyway.
    _flush(failure_level=logging.INFO)


# -- stored series -------------------------------------------------------------------------


class DeferredMetricSeries(DeferredModel):
    """Totals of one function, one queue, or all functions (``kind``): minutes of the last
    hour and hours of the last 7 days in ``data``, window totals as sortable properties."""

    kind = ndb.StringProperty()
    name = ndb.StringProperty()
    queues = ndb.TextProperty(repeated=True)
    runs_1h = ndb.IntegerProperty(default=0)
    runs_24h = ndb.IntegerProperty(default=0)
    runs_7d = ndb.IntegerProperty(default=0)
    failures_1h = ndb.IntegerProperty(default=0)
    failures_24h = ndb.IntegerProperty(default=0)
    failures_7d = ndb.IntegerProperty(default=0)
    p95_1h = ndb.FloatProperty(default=0)
    p95_24h = ndb.FloatProperty(default=0)
    p95_7d = ndb.FloatProperty(default=0)
    last_run = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    #: When a window total next changes by time alone (a minute or hour leaves its window).
    next_change = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    updated = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    #: {"m": {minute: slot}, "h": {hour: slot}, "vm": {minute: {version: [runs, failures]}},
    #: "vh": {hour: {...}}}; a slot is runs, successes, failures, retries, max ms and the
    #: bucket counts; "vm"/"vh" say which app version (GAE_VERSION) ran them.
    data = ndb.JsonProperty(indexed=False, compressed=True)


def series_key(kind: str, name: str) -> ndb.Key:
    digest = hashlib.sha256(f"{kind}\0{name}".encode()).hexdigest()[:32]
    return root_key(DeferredMetricSeries, f"{kind}-{digest}")


@dataclasses.dataclass
class Stats:
    """Totals of one window or one point of a chart; durations in ms (bucket upper bounds)."""

    runs: int = 0
    successes: int = 0
    failures: int = 0
    retries: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    max_ms: float = 0.0

    @classmethod
    def of(cls, slots: Iterable[list]) -> Stats:
        total = _empty_slot()
        for slot in slots:
            _add(total, slot)
        return cls(
            runs=total[_RUNS],
            successes=total[_OK],
            failures=total[_FAILED],
            retries=total[_RETRIES],
            p50_ms=_percentile(total, 0.50),
            p95_ms=_percentile(total, 0.95),
            max_ms=round(total[_MAX], 3),
        )


@dataclasses.dataclass
class Point(Stats):
    """One minute or hour of a chart."""

    start: datetime.datetime = dataclasses.field(default_factory=lambda: _epoch(0))


def _percentile(slot: list, fraction: float) -> float:
    """The upper bound of the bucket the ``fraction`` quantile falls in, clamped to the exact
    maximum (the quantile cannot exceed it): never "p95 30 ms" beside "max 27.8 ms"."""
    runs = slot[_RUNS]
    if not runs:
        return 0.0
    wanted = fraction * runs
    seen = 0
    for bucket, count in enumerate(slot[_HIST]):
        seen += count
        if count and seen >= wanted:
            bound = float(BUCKETS_MS[bucket]) if bucket < len(BUCKETS_MS) else slot[_MAX]
            return round(min(bound, slot[_MAX]), 3)
    return slot[_MAX]


def _epoch(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _unpack(slot: list) -> list:
    """A stored slot (histogram as [bucket, count] pairs) as an in-memory one."""
    full = _empty_slot()
    full[: _MAX + 1] = slot[: _MAX + 1]
    for bucket, count in slot[_HIST]:
        full[_HIST][bucket] = count
    return full


def _versions(stored: Any) -> dict[int, dict[str, list[int]]]:
    return {
        int(index): {str(version): [int(n) for n in pair] for version, pair in by_version.items()}
        for index, by_version in (stored or {}).items()
    }


def _pack(slot: list) -> list:
    return [*slot[: _MAX + 1], [[i, n] for i, n in enumerate(slot[_HIST]) if n]]


@dataclasses.dataclass
class Series:
    """A stored series, readable: window totals and the points of its charts."""

    kind: str
    name: str
    queues: list[str]
    last_run: datetime.datetime | None
    updated: datetime.datetime | None
    minutes: dict[int, list]
    hours: dict[int, list]
    #: minute (hour) -> app version -> [runs, failures]
    version_minutes: dict[int, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
    version_hours: dict[int, dict[str, list[int]]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, record: DeferredMetricSeries) -> Series:
        data = record.data or {}
        return cls(
            kind=record.kind,
            name=record.name,
            queues=list(record.queues or []),
            last_run=record.last_run,
            updated=record.updated,
            minutes={int(k): _unpack(v) for k, v in (data.get("m") or {}).items()},
            hours={int(k): _unpack(v) for k, v in (data.get("h") or {}).items()},
            version_minutes=_versions(data.get("vm")),
            version_hours=_versions(data.get("vh")),
        )

    def versions(self, name: str, now: float | None = None) -> dict[str, list[int]]:
        """App version -> [runs, failures] in a window (runs written before versions were
        recorded are not in it)."""
        now = time.time() if now is None else now
        if name == "1h":
            first, slots = int(now) // 60 - _MINUTE_SLOTS + 1, self.version_minutes
        else:
            first, slots = int(now) // 3600 - WINDOWS[name] // 3600 + 1, self.version_hours
        total: dict[str, list[int]] = {}
        for index, by_version in slots.items():
            if index >= first:
                for version, (runs, failed) in by_version.items():
                    mine = total.setdefault(version, [0, 0])
                    mine[0] += runs
                    mine[1] += failed
        return total

    def version_marks(self, hourly: bool, now: float | None = None) -> list[tuple[int, str]]:
        """(index in by_minute() / by_hour(), version) where the version that ran the most
        changes from the previous point that ran anything: the chart's version markers."""
        last = int(time.time() if now is None else now) // (3600 if hourly else 60)
        count = _HOUR_SLOTS if hourly else _MINUTE_SLOTS
        slots = self.version_hours if hourly else self.version_minutes
        marks: list[tuple[int, str]] = []
        previous = None
        for position, index in enumerate(range(last - count + 1, last + 1)):
            by_version = slots.get(index)
            if not by_version:
                continue
            top = max(sorted(by_version), key=lambda version: by_version[version][0])
            if previous is not None and top != previous:
                marks.append((position, top))
            previous = top
        return marks

    def _slots(self, name: str, now: float | None) -> list[list]:
        now = time.time() if now is None else now
        if name == "1h":
            first = int(now) // 60 - _MINUTE_SLOTS + 1
            return [slot for minute, slot in self.minutes.items() if minute >= first]
        first_hour = int(now) // 3600 - WINDOWS[name] // 3600 + 1
        return [slot for hour, slot in self.hours.items() if hour >= first_hour]

    def window(self, name: str, now: float | None = None) -> Stats:
        """Totals of ``1h``, ``24h`` or ``7d`` as of ``now`` (epoch seconds; default: now)."""
        return Stats.of(self._slots(name, now))

    def histogram(self, name: str, now: float | None = None) -> list[int]:
        """Runs per duration bucket (:data:`BUCKETS_MS`, then one for slower) in a window."""
        total = _empty_slot()
        for slot in self._slots(name, now):
            _add(total, slot)
        return list(total[_HIST])

    def by_minute(self, now: float | None = None) -> list[Point]:
        """The last 60 minutes, oldest first, empty minutes included."""
        last = int(time.time() if now is None else now) // 60
        return [self._point(self.minutes, m, 60) for m in range(last - _MINUTE_SLOTS + 1, last + 1)]

    def by_hour(self, now: float | None = None) -> list[Point]:
        """The last 7 days hour by hour, oldest first."""
        last = int(time.time() if now is None else now) // 3600
        return [self._point(self.hours, h, 3600) for h in range(last - _HOUR_SLOTS + 1, last + 1)]

    @staticmethod
    def _point(slots: dict[int, list], index: int, size: int) -> Point:
        stats = Stats.of([slots[index]] if index in slots else [])
        return Point(**dataclasses.asdict(stats), start=_epoch(index * size))

    def to_record(self, record: DeferredMetricSeries, now: float) -> None:
        """Write the slots still in a window, and the window totals, into ``record``."""
        first_minute = int(now) // 60 - _MINUTE_SLOTS + 1
        first_hour = int(now) // 3600 - _HOUR_SLOTS + 1
        self.minutes = {m: s for m, s in self.minutes.items() if m >= first_minute}
        self.hours = {h: s for h, s in self.hours.items() if h >= first_hour}
        self.version_minutes = {m: v for m, v in self.version_minutes.items() if m >= first_minute}
        self.version_hours = {h: v for h, v in self.version_hours.items() if h >= first_hour}
        for window in WINDOWS:
            stats = self.window(window, now)
            setattr(record, f"runs_{window}", stats.runs)
            setattr(record, f"failures_{window}", stats.failures)
            setattr(record, f"p95_{window}", stats.p95_ms)
        changes = [(m + _MINUTE_SLOTS) * 60 for m in self.minutes]
        for hour in self.hours:
            leaves_day = (hour + 24) * 3600
            changes.append(leaves_day if leaves_day > now else (hour + _HOUR_SLOTS) * 3600)
        record.populate(
            kind=self.kind,
            name=self.name[:MAX_INDEXED_CHARS],
            queues=sorted(self.queues),
            last_run=self.last_run,
            updated=_epoch(now),
            next_change=_epoch(min(changes)) if changes else None,
            data={
                "m": {str(m): _pack(s) for m, s in self.minutes.items()},
                "h": {str(h): _pack(s) for h, s in self.hours.items()},
                "vm": {str(m): v for m, v in self.version_minutes.items()},
                "vh": {str(h): v for h, v in self.version_hours.items()},
            },
        )


def get_series(kind: str, name: str) -> Series | None:
    """One series (one Lookup), or None when nothing was recorded for it."""
    record = series_key(kind, name).get()
    return Series.of(record) if record is not None else None


def all_functions() -> Series:
    """The series of every function together (empty when nothing ran yet)."""
    return get_series("all", "") or Series("all", "", [], None, None, {}, {})


# -- flushing ------------------------------------------------------------------------------


def _by_series(
    taken: dict[tuple[str, str], dict[int, list]],
) -> dict[tuple[str, str], tuple[dict[int, list], set[str]]]:
    """Per-minute totals of each function, each queue and all functions together."""
    result: dict[tuple[str, str], tuple[dict[int, list], set[str]]] = {}
    for (function, queue), minutes in taken.items():
        for key in (("function", function), ("queue", queue), ("all", "")):
            merged, queues = result.setdefault(key, ({}, set()))
            queues.add(queue)
            for minute, slot in minutes.items():
                _add(merged.setdefault(minute, _empty_slot()), slot)
    return result


def _fold(
    batch: list[tuple[tuple[str, str], tuple[dict[int, list], set[str]]]],
    now: float,
    version: str,
) -> None:
    """Add a batch of per-minute totals to their stored series (inside a transaction); this
    process's app ``version`` ran them."""
    keys = [series_key(kind, name) for (kind, name), _ in batch]
    records = ndb.get_multi(keys)
    for index, ((kind, name), (minutes, queues)) in enumerate(batch):
        record = records[index] or DeferredMetricSeries(key=keys[index])
        series = (
            Series.of(record)
            if records[index] is not None
            else Series(kind, name, [], None, None, {}, {})
        )
        for minute, slot in minutes.items():
            _add(series.minutes.setdefault(minute, _empty_slot()), slot)
            _add(series.hours.setdefault(minute // 60, _empty_slot()), slot)
            for versions in (
                series.version_minutes.setdefault(minute, {}),
                series.version_hours.setdefault(minute // 60, {}),
            ):
                mine = versions.setdefault(version, [0, 0])
                mine[0] += slot[_RUNS]
                mine[1] += slot[_FAILED]
        latest = _epoch(max(minutes) * 60 + 59)
        series.last_run = max(series.last_run or latest, latest)
        series.queues = sorted(set(series.queues) | queues)
        series.to_record(record, now)
        records[index] = record
    ndb.put_multi(records)


def flush() -> int:
    """Write this process's totals since the last flush; returns how many series changed.

    One transaction for up to 64 series (functions + queues + 1); on failure the totals stay
    in memory for the next flush.
    """
    return _flush(failure_level=logging.WARNING)


def _flush(*, failure_level: int) -> int:
    taken = _recorder.take()
    if not taken:
        return 0
    grouped = list(_by_series(taken).items())
    now = time.time()
    version = settings().app_version
    try:
        with ndb_context():
            for start in range(0, len(grouped), _BATCH):
                batch = grouped[start : start + _BATCH]
                ndb.transaction(lambda batch=batch: _fold(batch, now, version), retries=3)
    except Exception as exc:  # any Datastore trouble: keep the totals for the next flush
        logger.log(failure_level, "could not write task metrics (kept for the next flush): %s", exc)
        _recorder.give_back(taken)
        return 0
    return len(grouped)


# -- sweeper -------------------------------------------------------------------------------


def _refresh(keys: list[ndb.Key], now: float) -> None:
    records = [record for record in ndb.get_multi(keys) if record is not None]
    for record in records:
        Series.of(record).to_record(record, now)
    ndb.put_multi(records)


def maintain(now: datetime.datetime | None = None, batch: int = 200) -> tuple[int, int]:
    """Refresh window totals that aged without new runs, delete series quiet for 8 days.

    Returns (refreshed, purged). The sweeper calls it; each part reads at most ``batch`` keys.
    """
    moment = now or datetime.datetime.now(datetime.UTC)
    model = DeferredMetricSeries
    with ndb_context():
        doomed = model.query(model.last_run < moment - RETENTION).fetch(batch, keys_only=True)
        if doomed:
            ndb.delete_multi(doomed)
        stale = model.query(model.next_change <= moment).fetch(batch, keys_only=True)
        for start in range(0, len(stale), _BATCH):
            keys = stale[start : start + _BATCH]
            ndb.transaction(lambda keys=keys: _refresh(keys, moment.timestamp()), retries=3)
    return len(stale), len(doomed)


def sort_property(window: str, sort: str) -> Any:
    """The indexed property a metrics list sorts by (``runs_24h`` ...), descending."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}")
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}")
    return -getattr(DeferredMetricSeries, f"{sort}_{window}")


def observe_outcome(function: str, queue: str, seconds: float, result: str, retry: int) -> None:
    """:func:`observe` from the task path's terms: a TaskOutcome result and the retry count."""
    observe(function, queue, seconds, ok=result == "ok", retried=retry > 0)
