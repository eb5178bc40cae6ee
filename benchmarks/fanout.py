"""Benchmark 8: fan-out of many tasks, a sequential defer() loop vs batch(), with latency.

Both variants create the same number of inline tasks (``benchmarks.tasks.add``) through the real
CloudTasksClient against the in-process Cloud Tasks emulator (queue paused). A local emulator
answers in well under a millisecond, while CreateTask from App Engine typically takes tens of
milliseconds, so the emulator runs with ``latency_ms=LATENCY_MS``: every RPC waits that long in
the emulator's own worker before it is handled, as a round trip to the real service would, and
concurrent RPCs wait in parallel (its latency pool has ``LATENCY_RPC_WORKERS`` threads, more
than the batch's ``CONCURRENCY``, so the pool never caps the batch).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time
from collections.abc import Callable

from gae_deferred import batch, defer, reset_clients
from gae_deferred.local.cloudtasks import CloudTasksEmulator
from gae_deferred.local.cloudtasks.server import LATENCY_RPC_WORKERS
from gae_deferred.local.datastore import DatastoreEmulator

from . import tasks
from ._setup import BENCH_PROJECT
from .report import Section, ratio_target

#: Milliseconds the emulator adds to every RPC: a typical CreateTask round trip from App Engine.
LATENCY_MS = 30
CONCURRENCY = 32
TARGET = 15.0
QUEUE = "bench-fanout"
QUEUE_YAML = f"queue:\n- name: {QUEUE}\n  rate: 0/s\n"


def run(*, quick: bool) -> Section:
    count = 100 if quick else 1000
    with (
        tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp,
        _stack(pathlib.Path(tmp)) as emulator,
    ):
        if LATENCY_RPC_WORKERS < CONCURRENCY:
            raise RuntimeError(
                f"the emulator's latency pool ({LATENCY_RPC_WORKERS}) would cap the batch's "
                f"{CONCURRENCY} concurrent CreateTask calls"
            )
        for number in range(5):  # warm-up: channel, connection, code paths
            defer(tasks.add, number, 0, _queue=QUEUE)
        emulator.reset_counts()
        loop = _timed(lambda: [defer(tasks.add, n, 1, _queue=QUEUE) for n in range(count)])
        loop_creates = emulator.rpc_counts["CreateTask"]
        emulator.reset_counts()
        batched = _timed(lambda: _batch(count))
        batch_creates = emulator.rpc_counts["CreateTask"]
    if loop_creates != count or batch_creates != count:
        raise RuntimeError(f"expected {count} CreateTask each, got {loop_creates}/{batch_creates}")
    speedup = loop / batched
    section = Section(
        key="fanout",
        title="Fan-out: defer() loop vs batch()",
        what=(
            f"Wall time to enqueue {count:,} inline tasks (`benchmarks.tasks.add`) through the "
            "real CloudTasksClient into a paused queue of the in-process Cloud Tasks emulator "
            f"started with `latency_ms={LATENCY_MS}` (`--latency-ms`): every RPC waits "
            f"{LATENCY_MS} ms in the emulator before it is handled, because a CreateTask round "
            "trip from App Engine to Cloud Tasks takes tens of ms while a local emulator answers "
            "in well under 1 ms, and fan-out is about overlapping those waits. Delayed RPCs "
            f"wait in parallel in the emulator's pool of {LATENCY_RPC_WORKERS} threads (more "
            f"than the batch's {CONCURRENCY}, so the pool does not cap it). A sequential "
            f"`defer()` loop vs `batch(concurrency={CONCURRENCY})`. One run each, loop first; "
            "CreateTask counted at the emulator."
        ),
        columns=["variant", "seconds", "tasks/s", "CreateTask RPCs"],
    )
    section.rows += [
        ["defer() loop", f"{loop:.2f}", f"{count / loop:,.0f}", str(loop_creates)],
        ["batch()", f"{batched:.2f}", f"{count / batched:,.0f}", str(batch_creates)],
    ]
    section.targets.append(
        ratio_target("batch() speed-up over the loop", speedup, TARGET, at_least=True)
    )
    section.data = {"loop_s": loop, "batch_s": batched, "count": count, "latency_ms": LATENCY_MS}
    return section


def _batch(count: int) -> None:
    with batch(concurrency=CONCURRENCY) as fan_out:
        for number in range(count):
            fan_out.defer(tasks.add, number, 2, _queue=QUEUE)


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


class _stack:
    """Both emulators in-process (Datastore is idle here: every task is inline)."""

    def __init__(self, base: pathlib.Path) -> None:
        self.base = base

    def __enter__(self) -> CloudTasksEmulator:
        queue_yaml = self.base / "queue.yaml"
        queue_yaml.write_text(QUEUE_YAML, encoding="utf-8")
        self.datastore = DatastoreEmulator(port=0).start()
        self.tasks = CloudTasksEmulator(
            port=0,
            queue_yaml=str(queue_yaml),
            project=BENCH_PROJECT,
            location="us-central1",
            app_url="http://127.0.0.1:9",
            latency_ms=LATENCY_MS,
        ).start()
        # An earlier benchmark's stack may have left its project or location in the
        # environment; these emulators serve the benchmark project.
        os.environ["GOOGLE_CLOUD_PROJECT"] = BENCH_PROJECT
        os.environ.pop("GAE_DEFERRED_LOCATION", None)
        os.environ["DATASTORE_EMULATOR_HOST"] = self.datastore.address
        os.environ["CLOUD_TASKS_EMULATOR_HOST"] = f"127.0.0.1:{self.tasks.port}"
        reset_clients()
        return self.tasks

    def __exit__(self, *exc: object) -> None:
        self.tasks.stop()
        self.datastore.stop()
        os.environ.pop("DATASTORE_EMULATOR_HOST", None)
        os.environ.pop("CLOUD_TASKS_EMULATOR_HOST", None)
        reset_clients()
