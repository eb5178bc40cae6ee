"""Benchmark 5: end-to-end task throughput on the local stack vs the WSGI server's ceiling.

The stack (``LocalStack``: Datastore emulator, Cloud Tasks emulator, gunicorn main:app) runs on
free ports in a tmp dir with one effectively unlimited queue. N no-op tasks
(``benchmarks.tasks.mark_done``, one appended line each) are deferred into the paused queue,
then the queue is resumed and timed until every line is there. The ceiling is gunicorn with
the same worker settings serving :mod:`benchmarks.noop_wsgi`, driven by as many client threads
as the emulator dispatches concurrently, one new connection per request like the dispatcher.
The ceiling is measured before and after each stack run (A/B/A/B/A); the target is on the
median run.
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
from ._setup import ROOT
from .report import Section, ratio_target

QUEUE = "bench-throughput"
MAX_CONCURRENT = 50
#: The Cloud Tasks emulator's per-queue pool has at most 32 threads (see its README).
EMULATOR_THREADS = 32
QUEUE_YAML = f"""\
queue:
- name: {QUEUE}
  rate: 500/s
  bucket_size: 500
  max_concurrent_requests: {MAX_CONCURRENT}
"""
TARGET = 0.5
#: Stack runs of a full benchmark; the target is met on their median.
RUNS = 3
WORKERS, THREADS = 2, 4


def run(*, quick: bool) -> Section:
    count = 200 if quick else 2000
    concurrency = min(MAX_CONCURRENT, EMULATOR_THREADS)
    body = serialize(tasks.mark_done, 1)
    runs = 1 if quick else RUNS
    rates: list[tuple[float, float]] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        base = pathlib.Path(tmp)
        # Ceiling, stack, ceiling, stack, ...: each run is compared with the ceilings
        # measured right before and after it.
        ceilings = [_ceiling(base, count, concurrency, len(body))]
        for number in range(runs):
            run_dir = base / f"run-{number}"
            run_dir.mkdir()
            rates.append(_stack_rate(run_dir, count))
            ceilings.append(_ceiling(base, count, concurrency, len(body)))
            ratios.append(rates[-1][0] / ((ceilings[-2] + ceilings[-1]) / 2))
    ratio = statistics.median(ratios)
    section = Section(
        key="throughput",
        title="End-to-end throughput on the local stack",
        what=(
            f"{count:,} no-op tasks deferred into a paused queue (rate 500/s, bucket 500, "
            f"max_concurrent_requests {MAX_CONCURRENT}: the emulator dispatches with at most "
            f"{EMULATOR_THREADS} threads), then resumed and timed until all ran (each appends "
            f"a line to a file). Ceiling: gunicorn with the same settings ({WORKERS} workers x "
            f"{THREADS} threads) serving a no-op WSGI app, {count:,} POSTs of the same body size "
            f"from {concurrency} client threads, new connection per request (as the "
            f"dispatcher); measured before and after each of {runs} stack run(s), each run "
            "compared with the mean of the ceilings on either side; the target is on the "
            "median run."
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
    ]
    section.targets.append(
        ratio_target(
            f"executed tasks/s vs ceiling (median of {runs} run{'s' if runs > 1 else ''})",
            ratio,
            TARGET,
            at_least=True,
        )
    )
    section.data = {"ceilings": ceilings, "rates": rates, "ratios": ratios}
    return section


def _ceiling(base: pathlib.Path, count: int, concurrency: int, body_bytes: int) -> float:
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

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
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


def _stack_rate(base: pathlib.Path, count: int) -> tuple[float, float]:
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
    )
    try:
        stack.start()
        # The stack signs with its key file; a key in our environment would win over it.
        os.environ.pop("GAE_DEFERRED_SIGNING_KEY", None)
        os.environ.update({k: v for k, v in stack.env.items() if k != "PYTHONPATH"})
        _reset_clients()
        client = cloud_tasks.client()
        client.pause_queue(name=queue_path(QUEUE))
        for number in range(20):
            defer(tasks.mark_done, -1 - number, _queue=QUEUE)
        started = time.perf_counter()
        for number in range(count):
            defer(tasks.mark_done, number, _queue=QUEUE)
        defer_rate = count / (time.perf_counter() - started)
        total = count + 20
        started = time.perf_counter()
        client.resume_queue(name=queue_path(QUEUE))
        deadline = started + max(120.0, count / 5)
        while _lines(done) < total:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"only {_lines(done)} of {total} tasks ran in time")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        return total / elapsed, defer_rate
    finally:
        stack.stop()
        for name in (
            "DATASTORE_EMULATOR_HOST",
            "CLOUD_TASKS_EMULATOR_HOST",
            "GAE_DEFERRED_SIGNING_KEY_FILE",
            "GAE_DEFERRED_LOCAL",
            "GAE_DEFERRED_QUEUE_YAML",
            "GAE_DEFERRED_LOCATION",
        ):
            os.environ.pop(name, None)
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
