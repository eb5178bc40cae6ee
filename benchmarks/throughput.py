"""Benchmark 5: end-to-end task throughput on the local stack vs the WSGI server's ceiling.

The stack (``LocalStack``: Datastore emulator, Cloud Tasks emulator, gunicorn main:app) runs on
free ports in a tmp dir. N no-op tasks (``benchmarks.tasks.mark_done``, one appended line each)
are deferred round-robin into ``QUEUE_COUNT`` paused queues, then the queues are resumed and
timed until every line is there. Each queue allows 500 dispatches/s (Cloud Tasks' maximum) and
``PER_QUEUE_CONCURRENCY`` at once, so together they allow far more than the stack can run
(no rate limit binds) and dispatch ``DISPATCH_CONCURRENCY`` requests at a time.

The ceiling is gunicorn with the same worker settings serving :mod:`benchmarks.noop_wsgi`, driven
at that same concurrency, one new connection per request like the dispatcher, on the same path:
the Cloud Tasks emulator delivers to gunicorn's internal port (``LocalStack.dispatch_url``), as
Cloud Tasks delivers through Google's front end, off the instance's CPU. The ceiling is
measured before and after each stack run (A/B/A/B/A); the target is on the median run. One more
run dispatches through the local front end (``tasks_via_front=True``), reported only: what the
front end would cost if tasks went through it.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from gae_deferred import cloud_tasks, defer, reset_clients, serialize
from gae_deferred.cloud_tasks import queue_path
from gae_deferred.local.stack import LocalStack, free_port

from . import tasks
from ._setup import ROOT, forget_stack_env
from .report import Section, Target, ratio_target

#: Queues the tasks are spread over, each at Cloud Tasks' maximum rate of 500/s.
QUEUE_COUNT = 8
PER_QUEUE_CONCURRENCY = 4
#: What the emulator dispatches at once over all queues, and the ceiling's client threads.
DISPATCH_CONCURRENCY = QUEUE_COUNT * PER_QUEUE_CONCURRENCY
QUEUES = [f"bench-throughput-{number}" for number in range(QUEUE_COUNT)]
QUEUE_YAML = "queue:\n" + "".join(
    f"- name: {name}\n  rate: 500/s\n  bucket_size: 500\n"
    f"  max_concurrent_requests: {PER_QUEUE_CONCURRENCY}\n"
    for name in QUEUES
)
TARGET = 0.5
#: Stack runs of a full benchmark; the target is met on their median.
RUNS = 3
WORKERS, THREADS = 2, 4


def run(*, quick: bool) -> Section:
    count = 200 if quick else 2000
    body = serialize(tasks.mark_done, 1)
    runs = 1 if quick else RUNS
    rates: list[tuple[float, float]] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        base = pathlib.Path(tmp)
        # Ceiling, stack, ceiling, stack, ...: each run is compared with the ceilings
        # measured right before and after it.
        ceilings = [_ceiling(base, count, len(body))]
        for number in range(runs):
            run_dir = base / f"run-{number}"
            run_dir.mkdir()
            rates.append(_stack_rate(run_dir, count, via_front=False))
            ceilings.append(_ceiling(base, count, len(body)))
            ratios.append(rates[-1][0] / ((ceilings[-2] + ceilings[-1]) / 2))
        front_dir = base / "via-front"
        front_dir.mkdir()
        via_front = _stack_rate(front_dir, count, via_front=True)[0]
        ceilings.append(_ceiling(base, count, len(body)))
        front_ratio = via_front / ((ceilings[-2] + ceilings[-1]) / 2)
    ratio = statistics.median(ratios)
    section = Section(
        key="throughput",
        title="End-to-end throughput on the local stack",
        what=(
            f"{count:,} no-op tasks deferred round-robin into {QUEUE_COUNT} paused queues "
            f"(each rate 500/s, Cloud Tasks' maximum, bucket 500, max_concurrent_requests "
            f"{PER_QUEUE_CONCURRENCY}: together {QUEUE_COUNT * 500:,}/s, more than the stack "
            f"runs, so no rate limit binds, and {DISPATCH_CONCURRENCY} requests at once), then "
            "resumed and timed until all ran (each appends a line to a file). The Cloud Tasks "
            "emulator delivers to gunicorn's internal port, as Cloud Tasks delivers through "
            "Google's front end, which does not run on the instance (docs/local-stack.md). "
            f"Ceiling: gunicorn with the same settings ({WORKERS} workers x {THREADS} threads) "
            f"serving a no-op WSGI app, {count:,} POSTs of the same body size from "
            f"{DISPATCH_CONCURRENCY} client threads (the dispatcher's concurrency), new "
            "connection per request (as the dispatcher), straight to gunicorn (the same path); "
            f"measured before and after each of {runs} stack run(s), each run compared with the "
            "mean of the ceilings on either side; the target is on the median run. The last "
            "stack run dispatches through the local front end instead (report only)."
        ),
        columns=["measure", "per second"],
    )
    section.rows += [
        ["ceiling: gunicorn no-op POST (runs)", " / ".join(f"{c:,.0f}" for c in ceilings)],
        ["stack: tasks executed", " / ".join(f"{rate:,.0f}" for rate, _ in rates)],
        [
            "defer() calls from one thread (CreateTask round trips)",
            " / ".join(f"{rate:,.0f}" for _, rate in rates),
        ],
        ["stack / adjacent ceilings (runs)", " / ".join(f"{r:.2f}" for r in ratios)],
        ["stack, dispatching through the front end (report only)", f"{via_front:,.0f}"],
        ["that run / adjacent ceilings", f"{front_ratio:.2f}"],
    ]
    section.targets.append(
        ratio_target(
            f"executed tasks/s vs ceiling (median of {runs} run{'s' if runs > 1 else ''})",
            ratio,
            TARGET,
            at_least=True,
        )
    )
    section.targets.append(
        Target(
            "executed tasks/s vs ceiling, dispatching through the front end (report only)",
            f"{front_ratio:.2f}x",
            "—",
            True,
        )
    )
    section.data = {
        "ceilings": ceilings,
        "rates": rates,
        "ratios": ratios,
        "via_front": via_front,
        "via_front_ratio": front_ratio,
    }
    return section


def _ceiling(base: pathlib.Path, count: int, body_bytes: int) -> float:
    port = free_port()
    log = open(base / f"ceiling-{port}.log", "w", encoding="utf-8")  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "benchmarks.noop_wsgi:app",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(WORKERS),
            "--threads",
            str(THREADS),
            "--access-logfile",
            "-",
            "--error-logfile",
            "-",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/", server)
        payload = b"x" * body_bytes

        def post(_: int) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("POST", "/_ah/queue/deferred", body=payload)
                response = conn.getresponse()
                response.read()
                return response.status
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(DISPATCH_CONCURRENCY) as pool:
            list(pool.map(post, range(min(200, count))))
            started = time.perf_counter()
            statuses = list(pool.map(post, range(count)))
            elapsed = time.perf_counter() - started
        if any(status != 200 for status in statuses):
            raise RuntimeError("the no-op gunicorn answered something other than 200")
        return count / elapsed
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def _wait_http(url: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def _stack_rate(base: pathlib.Path, count: int, *, via_front: bool) -> tuple[float, float]:
    """(tasks executed per second after resume, defer() calls per second)."""
    queue_yaml = base / "queue.yaml"
    queue_yaml.write_text(QUEUE_YAML, encoding="utf-8")
    done = base / "done.txt"
    done.touch()
    saved = {
        name: os.environ.get(name) for name in (tasks.DONE_FILE_ENV, "GAE_DEFERRED_SIGNING_KEY")
    }
    os.environ[tasks.DONE_FILE_ENV] = str(done)
    stack = LocalStack(
        ROOT / "app.yaml",
        base / "stack",
        app_port=0,
        datastore_port=0,
        tasks_port=0,
        queue_yaml=queue_yaml,
        tasks_via_front=via_front,
    )
    try:
        stack.start()
        # The stack signs with its key file; a key in our environment would win over it.
        os.environ.pop("GAE_DEFERRED_SIGNING_KEY", None)
        os.environ.update({k: v for k, v in stack.env.items() if k != "PYTHONPATH"})
        _reset_clients()
        client = cloud_tasks.client()
        for queue in QUEUES:
            client.pause_queue(name=queue_path(queue))
        warm_up = 2 * QUEUE_COUNT
        for number in range(warm_up):
            defer(tasks.mark_done, -1 - number, _queue=QUEUES[number % QUEUE_COUNT])
        started = time.perf_counter()
        for number in range(count):
            defer(tasks.mark_done, number, _queue=QUEUES[number % QUEUE_COUNT])
        defer_rate = count / (time.perf_counter() - started)
        total = count + warm_up
        started = time.perf_counter()
        for queue in QUEUES:
            client.resume_queue(name=queue_path(queue))
        deadline = started + max(120.0, count / 5)
        while _lines(done) < total:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"only {_lines(done)} of {total} tasks ran in time")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        return total / elapsed, defer_rate
    finally:
        stack.stop()
        forget_stack_env()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reset_clients()


def _lines(path: pathlib.Path) -> int:
    with open(path, "rb") as handle:
        return handle.read().count(b"\n")


def _reset_clients() -> None:
    reset_clients()
