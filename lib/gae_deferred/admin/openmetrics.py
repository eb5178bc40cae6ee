"""``GET /_ah/deferred-admin/metrics.prom``: the dashboard's numbers as OpenMetrics text.

Task metrics are sliding windows (gae_deferred.metrics keeps the minutes of the last hour and
the hours of 7 days, not totals since a start), so they are exported as gauges and gauge
histograms of one window (``window`` label, ``1h`` unless asked), not as counters::

    # TYPE gae_deferred_function_runs gauge
    gae_deferred_function_runs{function="reports.build",window="1h"} 42
    # TYPE gae_deferred_function_duration_seconds gaugehistogram
    gae_deferred_function_duration_seconds_bucket{function="reports.build",le="0.001",...} 0
    ...
    # EOF

Refused deliveries (:mod:`gae_deferred.refusals`) are totals that only grow: counters.

Cost: the function and queue series (at most :data:`MAX_SERIES` of each, one query each), the
overview's bounded counts (spilled payloads per state, failure records per state, each capped
at COUNT_CAP) and its projection of stored bytes (SCAN_CAP records).
"""

from __future__ import annotations

import time
from typing import Any

from .. import failures, metrics, refusals, spillover
from ..failures import FailureState
from ..spillover import PayloadState
from ._common import COUNT_CAP, SCAN_CAP

CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
#: Function (and queue) series exported per scrape, most runs in the window first.
MAX_SERIES = 1_000


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape(str(value))}"' for name, value in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, unit: str = "") -> None:
        self.lines.append(f"# TYPE {name} {kind}")
        if unit:
            self.lines.append(f"# UNIT {name} {unit}")
        self.lines.append(f"# HELP {name} {_escape(help_text)}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join([*self.lines, "# EOF"]) + "\n"


def _series(kind: str, window: str) -> list[metrics.Series]:
    model = metrics.DeferredMetricSeries
    query = model.query(model.kind == kind).order(metrics.sort_property(window, "runs"))
    return [metrics.Series.of(record) for record in query.fetch(MAX_SERIES)]


def _stats_families(
    out: _Writer, prefix: str, label: str, rows: list[tuple[str, Any]], window: str
) -> None:
    for field, help_text in (
        ("runs", "task runs in the window"),
        ("failures", "task runs that failed in the window (each attempt counts)"),
        ("retries", "task runs that were retries in the window"),
    ):
        out.family(f"{prefix}_{field}", "gauge", f"{help_text}, per {label}")
        for name, stats in rows:
            out.sample(f"{prefix}_{field}", {label: name, "window": window}, getattr(stats, field))


def _histogram(
    out: _Writer, name: str, label: str, rows: list[tuple[str, list[int]]], window: str
) -> None:
    out.family(
        name,
        "gaugehistogram",
        f"task run durations in the window, per {label} (fixed buckets)",
        "seconds",
    )
    for key, hist in rows:
        labels = {label: key, "window": window}
        seen = 0
        for bound, count in zip(metrics.BUCKETS_MS, hist, strict=False):
            seen += count
            out.sample(f"{name}_bucket", {**labels, "le": _number(bound / 1000)}, seen)
        seen += hist[len(metrics.BUCKETS_MS)]
        out.sample(f"{name}_bucket", {**labels, "le": "+Inf"}, seen)
        out.sample(f"{name}_gcount", labels, seen)


def render(window: str = "1h", now: float | None = None) -> str:
    """The OpenMetrics exposition of task metrics in ``window`` and of the stored records."""
    if window not in metrics.WINDOWS:
        raise ValueError(f"window must be one of {', '.join(metrics.WINDOWS)}")
    now = time.time() if now is None else now
    out = _Writer()
    for kind, label in (("function", "function"), ("queue", "queue")):
        series = _series(kind, window)
        stats = [(item.name, item.window(window, now)) for item in series]
        _stats_families(out, f"gae_deferred_{kind}", label, stats, window)
        _histogram(
            out,
            f"gae_deferred_{kind}_duration_seconds",
            label,
            [(item.name, item.histogram(window, now)) for item in series],
            window,
        )
    by_version = metrics.all_functions().versions(window, now)
    for field, position, help_text in (
        ("runs", 0, "task runs in the window per app version (GAE_VERSION)"),
        ("failures", 1, "failed task runs in the window per app version (GAE_VERSION)"),
    ):
        out.family(f"gae_deferred_version_{field}", "gauge", help_text)
        for version, pair in sorted(by_version.items()):
            out.sample(
                f"gae_deferred_version_{field}",
                {"version": version, "window": window},
                pair[position],
            )
    payload, failure = spillover.DeferredPayload, failures.DeferredFailure
    spilled = {
        state: payload.query(payload.state == state).count_async(limit=COUNT_CAP)
        for state in PayloadState
    }
    records = {
        state: failure.query(failure.state == state).count_async(limit=COUNT_CAP)
        for state in FailureState
    }
    sizes = payload.query(projection=[payload.stored_bytes]).fetch_async(SCAN_CAP)
    out.family(
        "gae_deferred_spilled_payloads",
        "gauge",
        f"spilled payload records per state (counted up to {COUNT_CAP})",
    )
    for state, future in spilled.items():
        out.sample("gae_deferred_spilled_payloads", {"state": state}, future.result())
    out.family(
        "gae_deferred_spilled_payload_bytes",
        "gauge",
        f"bytes stored by spilled payloads (the first {SCAN_CAP} records)",
        "bytes",
    )
    out.sample(
        "gae_deferred_spilled_payload_bytes", {}, sum(r.stored_bytes for r in sizes.result())
    )
    out.family(
        "gae_deferred_failure_records",
        "gauge",
        f"failure records per state (counted up to {COUNT_CAP})",
    )
    for state, future in records.items():
        out.sample("gae_deferred_failure_records", {"state": state}, future.result())
    refused = refusals.summary()
    out.family(
        "gae_deferred_refused_deliveries",
        "counter",
        "task deliveries the task handler refused (403), per reason, all instances",
    )
    for reason, count in sorted(refused["counts"].items()):
        out.sample("gae_deferred_refused_deliveries_total", {"reason": reason}, count)
    out.family(
        "gae_deferred_legacy_pickle_runs",
        "counter",
        "python27 pickles the task handler ran while draining (legacy_pickles_until)",
    )
    out.sample("gae_deferred_legacy_pickle_runs_total", {}, refused["legacy_runs"])
    return out.text()
