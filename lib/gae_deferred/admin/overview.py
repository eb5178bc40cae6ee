"""The overview numbers and charts, execution metrics, the audit log and the sweeper."""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any
from urllib.parse import urlencode

from .. import audit, failures, metrics, spillover, sweeper
from ..errors import (
    BadRequest,
    NotFound,
)
from ..spillover import PayloadState
from ._common import (
    _HISTOGRAM_BOUNDS,
    COUNT_CAP,
    LIST_COUNT_CAP,
    MAX_PAGE_SIZE,
    PAGE_SIZE,
    PREFIX,
    SCAN_CAP,
    Page,
    QueueInfo,
    _fetch_page,
    _iso,
    _now,
    decode_cursor,
    encode_cursor,
    format_bytes,
    url_segment,
)
from .queued import (
    queue_json,
)


@dataclasses.dataclass
class Overview:
    """Numbers for the overview page; ``*_capped`` means "at least this many"."""

    spill_counts: dict[str, int]
    spill_counts_capped: dict[str, bool]
    stored_bytes: int
    stored_scanned: int
    stored_capped: bool
    size_histogram: list[tuple[str, int]]
    failures_hour: int
    failures_day: int
    failures_capped: bool
    failures_by_hour: list[tuple[datetime.datetime, int]]
    #: Runs per minute over the last hour, all functions: (minute, processed, failed).
    runs_by_minute: list[tuple[datetime.datetime, int, int]]
    #: (index in runs_by_minute, app version) where the version that ran changes.
    run_versions: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def overview_json(numbers: Overview, queues: list[QueueInfo]) -> dict[str, Any]:
    """The API view of the overview page."""
    data = dataclasses.asdict(numbers)
    data["failures_by_hour"] = [[_iso(hour), count] for hour, count in numbers.failures_by_hour]
    data["runs_by_minute"] = [
        [_iso(minute), processed, failed] for minute, processed, failed in numbers.runs_by_minute
    ]
    data["queues"] = [queue_json(queue) for queue in queues]
    return data


def _histogram_label(index: int) -> str:
    bounds = _HISTOGRAM_BOUNDS
    if index == 0:
        return f"< {format_bytes(bounds[0])}"
    if index == len(bounds):
        return f">= {format_bytes(bounds[-1])}"
    return f"{format_bytes(bounds[index - 1])}-{format_bytes(bounds[index])}"


def overview() -> Overview:
    """Counts and chart data, with bounded cost (see the module docstring).

    Spillover counts: ``count(limit=COUNT_CAP)`` per state (built-in index on ``state``).
    Stored bytes and size histogram: a projection on ``stored_bytes`` of at most SCAN_CAP
    records. Failures in the last hour/day: ``count(limit=COUNT_CAP)`` on ``last_seen``; the
    24 h chart: a projection on ``last_seen`` of at most SCAN_CAP records. Runs per minute: one
    Lookup of the metrics of all functions.
    """
    payload, failure = spillover.DeferredPayload, failures.DeferredFailure
    now = _now()
    day_ago = now - datetime.timedelta(days=1)
    counts = {
        state: payload.query(payload.state == state).count_async(limit=COUNT_CAP)
        for state in PayloadState
    }
    sizes = payload.query(projection=[payload.stored_bytes]).fetch_async(SCAN_CAP)
    hour = failure.query(failure.last_seen >= now - datetime.timedelta(hours=1)).count_async(
        limit=COUNT_CAP
    )
    day = failure.query(failure.last_seen >= day_ago).count_async(limit=COUNT_CAP)
    seen = failure.query(failure.last_seen >= day_ago, projection=[failure.last_seen]).fetch_async(
        SCAN_CAP
    )
    runs = metrics.all_functions()
    spill_counts = {state: future.result() for state, future in counts.items()}
    size_rows = sizes.result()
    histogram = [0] * (len(_HISTOGRAM_BOUNDS) + 1)
    for row in size_rows:
        histogram[sum(1 for bound in _HISTOGRAM_BOUNDS if row.stored_bytes >= bound)] += 1
    start = now.replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=23)
    by_hour = [0] * 24
    for row in seen.result():
        slot = int((row.last_seen - start).total_seconds() // 3600)
        if 0 <= slot < 24:
            by_hour[slot] += 1
    failures_day = day.result()
    return Overview(
        spill_counts=spill_counts,
        spill_counts_capped={state: count >= COUNT_CAP for state, count in spill_counts.items()},
        stored_bytes=sum(row.stored_bytes for row in size_rows),
        stored_scanned=len(size_rows),
        stored_capped=len(size_rows) >= SCAN_CAP,
        size_histogram=[(_histogram_label(i), n) for i, n in enumerate(histogram)],
        failures_hour=hour.result(),
        failures_day=failures_day,
        failures_capped=failures_day >= COUNT_CAP,
        failures_by_hour=[(start + datetime.timedelta(hours=i), n) for i, n in enumerate(by_hour)],
        runs_by_minute=[
            (point.start, point.runs, point.failures) for point in runs.by_minute(now.timestamp())
        ],
        run_versions=runs.version_marks(hourly=False, now=now.timestamp()),
    )


def series_json(series: metrics.Series, now: float | None = None) -> dict[str, Any]:
    """The API view of a metrics series: totals of every window, as of ``now``."""
    return {
        "kind": series.kind,
        "name": series.name,
        "queues": series.queues,
        "last_run": _iso(series.last_run),
        "windows": {
            window: dataclasses.asdict(series.window(window, now)) for window in metrics.WINDOWS
        },
    }


def _point_json(point: metrics.Point) -> dict[str, Any]:
    return {**dataclasses.asdict(point), "start": _iso(point.start)}


def _check_window(window: str, sort: str = "runs") -> None:
    if window not in metrics.WINDOWS:
        raise BadRequest(f"window must be one of {', '.join(metrics.WINDOWS)}")
    if sort not in metrics.SORTS:
        raise BadRequest(f"sort must be one of {', '.join(metrics.SORTS)}")


def versions_json(series: metrics.Series, window: str, now: float) -> list[dict[str, Any]]:
    """Runs and failures per app version in a window, most runs first."""
    found = series.versions(window, now)
    return [
        {"version": version, "runs": runs, "failures": failed}
        for version, (runs, failed) in sorted(found.items(), key=lambda item: -item[1][0])
    ]


def list_metrics(
    window: str = "24h", sort: str = "runs", *, cursor: str | None = None, limit: int = PAGE_SIZE
) -> dict[str, Any]:
    """One page of functions, most runs (failures, slowest p95) in ``window`` first, with the
    totals of every queue and of all functions.

    One indexed query (``kind``, ``-<sort>_<window>``) for the page; the order is the one the
    last flush or sweep stored, the numbers are as of now.
    """
    _check_window(window, sort)
    model = metrics.DeferredMetricSeries
    query = model.query(model.kind == "function").order(metrics.sort_property(window, sort))
    page = _fetch_page(query, f"metrics|{window}|{sort}", cursor, limit)
    queues = model.query(model.kind == "queue").fetch_async(MAX_PAGE_SIZE)
    everything = metrics.all_functions()
    now = _now().timestamp()
    return {
        "window": window,
        "sort": sort,
        "items": [series_json(metrics.Series.of(record), now) for record in page.items],
        "next_cursor": page.next_cursor,
        "queues": sorted(
            (series_json(metrics.Series.of(record), now) for record in queues.result()),
            key=lambda queue: queue["name"],
        ),
        "all": series_json(everything, now),
        "versions": versions_json(everything, window, now),
        "buckets_ms": list(metrics.BUCKETS_MS),
    }


def function_metrics(function: str, window: str = "24h") -> dict[str, Any]:
    """One function's totals and its charts: the last hour by minute, 7 days by hour."""
    _check_window(window)
    series = metrics.get_series("function", function)
    if series is None:
        raise NotFound(f"no runs of {function!r} recorded in the last 8 days")
    now = _now().timestamp()
    return {
        **series_json(series, now),
        "window": window,
        "by_minute": [_point_json(point) for point in series.by_minute(now)],
        "by_hour": [_point_json(point) for point in series.by_hour(now)],
        "marks_by_minute": series.version_marks(hourly=False, now=now),
        "marks_by_hour": series.version_marks(hourly=True, now=now),
        "versions": versions_json(series, window, now),
    }


def list_audit(*, cursor: str | None = None, limit: int = PAGE_SIZE) -> Page:
    """One page of audit entries, newest first."""
    entries, next_cursor = audit.recent(limit, decode_cursor(cursor, "audit"))
    return Page(entries, encode_cursor(next_cursor, "audit"))


def audit_total() -> tuple[int, bool]:
    """(count, capped) of audit entries: keys only, at most LIST_COUNT_CAP + 1."""
    count = audit.DeferredAudit.query().count(limit=LIST_COUNT_CAP + 1)
    return min(count, LIST_COUNT_CAP), count > LIST_COUNT_CAP


def audit_json(entry: audit.DeferredAudit) -> dict[str, Any]:
    """The API view of an audit entry; ``target_url`` is the dashboard page of its target
    (None for the sweeper) and ``target_label`` how a page shows it."""
    url, label = target_link(entry.target or "")
    return {
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "target_url": url,
        "target_label": label,
        "when": _iso(entry.when),
        "detail": entry.detail,
    }


def target_link(target: str) -> tuple[str | None, str]:
    """(dashboard URL, label) of an audit target: ``failure/<id>``, ``spillover/<id>``,
    ``queue/<q>``, ``task/<q>/<task>``, or a bulk action's ``failures?{filter json}`` /
    ``spillover?{...}``; (None, target) for anything else."""
    kind, _, rest = target.partition("/")
    if kind in ("failure", "spillover") and rest:
        section = "failures" if kind == "failure" else "spillover"
        return f"{PREFIX}/{section}/{url_segment(rest)}", target
    if kind == "queue" and rest:
        return f"{PREFIX}/queues/{url_segment(rest)}", target
    if kind == "task" and rest.count("/") == 1:
        queue, task = rest.split("/")
        return f"{PREFIX}/queues/{url_segment(queue)}/tasks/{url_segment(task)}", target
    section, mark, filters = target.partition("?")
    if mark and section in ("failures", "spillover"):
        try:
            params = json.loads(filters)
        except ValueError:
            return None, target
        if isinstance(params, dict):
            path = "/failures/list" if section == "failures" else "/spillover"
            query = urlencode({str(k): str(v) for k, v in params.items()})
            label = f"{section} where " + (
                ", ".join(f"{k}={v}" for k, v in params.items()) or "anything"
            )
            return f"{PREFIX}{path}" + (f"?{query}" if query else ""), label
    return None, target


def run_sweeper(actor: str, *, audit_idle: bool = True) -> dict[str, Any]:
    """Run the sweeper once and audit it; a scheduled run that did nothing is not audited."""
    data = dataclasses.asdict(sweeper.sweep())
    summary = ", ".join(f"{key} {value}" for key, value in data.items() if value)
    if summary or audit_idle:
        audit.record(actor, "sweep", "sweeper", summary or "nothing to do")
    return data
