"""Benchmark 8: execution metrics: what counting costs the task path, what flushing writes,
and the Metrics page's time as the number of functions grows.

1. CPU per task of our handler (the handler benchmark's setup: in-process WSGI, in-process
   Datastore emulator) with ``metrics_enabled`` on vs off, interleaved rounds.
2. Datastore Commit RPCs for 1,000 tasks with metrics on: one per flush, none per task.
3. ``/metrics`` and ``/api/metrics`` wall time with 10, 100 and 1,000 functions recorded.
"""

from __future__ import annotations

import os
import statistics
import time

import webapp2

import gae_deferred
from gae_deferred import metrics
from gae_deferred.local.datastore import DatastoreEmulator
from gae_deferred.webapp2 import deferred_routes

from . import floor, tasks, timing
from .dashboard import _get
from .report import Section, count_target, ratio_target

CPU_BUDGET = 1.05
PAGE_BUDGET = 3.0
PAGES = ("/_ah/deferred-admin/metrics?window=24h", "/_ah/deferred-admin/api/metrics?window=24h")


def _cpu(app: webapp2.WSGIApplication, rounds: int, inner: int) -> timing.Comparison:
    environ = floor.environ_factory(gae_deferred.serialize(tasks.add, 1, 2))
    current = gae_deferred.settings()

    def with_metrics(enabled: bool):
        def call() -> None:
            current.metrics_enabled = enabled
            floor.call_wsgi(app, environ())

        return call

    try:
        return timing.compare(
            {"off": with_metrics(False), "on": with_metrics(True)}, rounds=rounds, inner=inner
        )
    finally:
        current.metrics_enabled = True
        metrics.discard_pending()


def _writes(emulator: DatastoreEmulator, app: webapp2.WSGIApplication, flushes: int) -> int:
    environ = floor.environ_factory(gae_deferred.serialize(tasks.add, 1, 2))
    metrics.discard_pending()
    emulator.reset_counts()
    for number in range(1000):
        floor.call_wsgi(app, environ())
        if (number + 1) % (1000 // flushes) == 0:
            metrics.flush()
    return emulator.rpc_counts["Commit"]


def _page_times(app: webapp2.WSGIApplication, sizes: tuple[int, ...], repeats: int) -> dict:
    results: dict[str, dict[int, float]] = {page: {} for page in PAGES}
    have = 0
    for size in sizes:
        for number in range(have, size):
            metrics.observe(
                f"bench.fn{number:05d}", "default", 0.001 * (number % 50), ok=True, retried=False
            )
        metrics.flush()
        have = size
        for page in PAGES:
            _get(app, page)
        samples: dict[str, list[float]] = {page: [] for page in PAGES}
        for index in range(repeats):
            for page in PAGES if index % 2 == 0 else PAGES[::-1]:
                started = time.perf_counter()
                _get(app, page)
                samples[page].append(time.perf_counter() - started)
        for page in PAGES:
            results[page][size] = statistics.median(samples[page])
    return results


def run(*, quick: bool) -> Section:
    rounds, inner = (7, 50) if quick else (31, 100)
    sizes = (10, 100) if quick else (10, 100, 1000)
    repeats = 3 if quick else 9
    emulator = DatastoreEmulator(port=0).start()
    os.environ["DATASTORE_EMULATOR_HOST"] = emulator.address
    gae_deferred.reset_clients()
    gae_deferred.configure(local_mode=True)
    try:
        app = webapp2.WSGIApplication(deferred_routes())
        if not floor.call_wsgi(
            app, floor.environ_factory(gae_deferred.serialize(tasks.add, 1, 2))()
        ).startswith("200"):
            raise RuntimeError("our handler did not answer 200 to the benchmark task")
        cpu = _cpu(app, rounds, inner)
        one_flush = _writes(emulator, app, flushes=1)
        four_flushes = _writes(emulator, app, flushes=4)
        pages = _page_times(app, sizes, repeats)
    finally:
        emulator.stop()
        os.environ.pop("DATASTORE_EMULATOR_HOST", None)
        gae_deferred.reset_clients()
        metrics.discard_pending()

    ratio = cpu.ratio("on", "off")
    section = Section(
        key="metrics",
        title="Execution metrics",
        what=(
            "CPU per task (`time.thread_time`, the handler benchmark's in-process setup running "
            f"`benchmarks.tasks.add(1, 2)`) with metrics off and on, {rounds} interleaved rounds "
            f"of {inner} calls, medians; Datastore Commit RPCs at the in-process emulator for "
            "1,000 tasks flushed once and four times (the flush thread's job, here called "
            f"directly); wall ms per metrics page with N functions recorded, median of {repeats}."
        ),
        columns=["measure", "value"],
    )
    per_call = cpu.per_call
    section.rows.append(["task CPU us, metrics off", f"{per_call['off'] * 1e6:.1f}"])
    section.rows.append(["task CPU us, metrics on", f"{per_call['on'] * 1e6:.1f}"])
    section.rows.append(
        ["Commits for 1,000 tasks, 1 flush / 4 flushes", f"{one_flush} / {four_flushes}"]
    )
    for page in PAGES:
        label = page.removeprefix("/_ah/deferred-admin")
        for size in sizes:
            section.rows.append(
                [f"{label}: ms with {size:,} functions", f"{pages[page][size] * 1e3:.1f}"]
            )
    section.targets.append(ratio_target("task CPU, metrics on vs off", ratio, CPU_BUDGET))
    section.targets.append(count_target("Commits for 1,000 tasks, 1 flush", one_flush, 1))
    section.targets.append(count_target("Commits for 1,000 tasks, 4 flushes", four_flushes, 4))
    for page in PAGES:
        growth = pages[page][sizes[-1]] / pages[page][sizes[0]]
        label = page.removeprefix("/_ah/deferred-admin")
        section.targets.append(
            ratio_target(f"{label}: time({sizes[-1]:,}) / time({sizes[0]:,})", growth, PAGE_BUDGET)
        )
    section.data = {
        "cpu": cpu.to_json(),
        "commits": {"1": one_flush, "4": four_flushes},
        "pages": {page: {str(n): v for n, v in by.items()} for page, by in pages.items()},
    }
    return section
