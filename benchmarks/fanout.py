"""Benchmark 8: fan-out of many tasks, a sequential defer() loop vs batch(), with latency.

Both variants create inline tasks (``benchmarks.tasks.add``) through the real CloudTasksClient
against the in-process Cloud Tasks emulator (queues paused). A local emulator answers in well
under a millisecond, while a Cloud Tasks call from App Engine typically takes tens of
milliseconds, so the emulator runs with ``latency_ms=LATENCY_MS``: every RPC waits that long in
the emulator's own worker before it is handled, as a round trip to the real service would, and
concurrent RPCs wait in parallel (its latency pool has ``LATENCY_RPC_WORKERS`` threads, more
than the batch's ``CONCURRENCY``, so the pool never caps the batch). The loop makes one
CreateTask per task; batch() one BatchCreateTasks per 100 tasks of a queue.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time
from collections.abc import Callable

from gae_deferred import batch, defer, reset_clients
from gae_deferred.cloud_tasks import BATCH_CREATE_MAX
from gae_deferred.local.cloudtasks import CloudTasksEmulator
from gae_deferred.local.cloudtasks.server import LATENCY_RPC_WORKERS
from gae_deferred.local.datastore import DatastoreEmulator

from . import tasks
from ._setup import BENCH_PROJECT
from .report import Section, ratio_target

#: Milliseconds the emulator adds to every RPC: a typical Cloud Tasks round trip from App Engine.
LATENCY_MS = 30
CONCURRENCY = 32
TARGET = 100.0
QUEUE = "bench-fanout"
#: The wide fan-out's queues: batch() groups each queue's tasks into calls of its own.
WIDE_QUEUES = [QUEUE, "bench-fanout-2", "bench-fanout-3", "bench-fanout-4"]
QUEUE_YAML = "queue:\n" + "".join(f"- name: {queue}\n  rate: 0/s\n" for queue in WIDE_QUEUES)


def run(*, quick: bool) -> Section:
    count, wide = (100, 1000) if quick else (1000, 10_000)
    with (
        tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp,
        _stack(pathlib.Path(tmp)) as emulator,
    ):
        if LATENCY_RPC_WORKERS < CONCURRENCY:
            raise RuntimeError(
                f"the emulator's latency pool ({LATENCY_RPC_WORKERS}) would cap the batch's "
                f"{CONCURRENCY} concurrent calls"
            )
        for number in range(5):  # warm-up: channel, connection, code paths
            defer(tasks.add, number, 0, _queue=QUEUE)
        _batch(2 * BATCH_CREATE_MAX, [QUEUE])
        emulator.reset_counts()
        loop = _timed(lambda: [defer(tasks.add, n, 1, _queue=QUEUE) for n in range(count)])
        loop_rpcs = _rpcs(emulator)
        batched = _timed(lambda: _batch(count, [QUEUE]))
        batch_rpcs = _rpcs(emulator)
        spread = _timed(lambda: _batch(wide, WIDE_QUEUES))
        wide_rpcs = _rpcs(emulator)
    _check_rpcs(loop_rpcs, {"CreateTask": count})
    _check_rpcs(batch_rpcs, {"BatchCreateTasks": _batch_calls(count, 1)})
    _check_rpcs(wide_rpcs, {"BatchCreateTasks": _batch_calls(wide, len(WIDE_QUEUES))})
    speedup = loop / batched
    section = Section(
        key="fanout",
        title="Fan-out: defer() loop vs batch()",
        what=(
            "Wall time to enqueue inline tasks (`benchmarks.tasks.add`) through the real "
            "CloudTasksClient into paused queues of the in-process Cloud Tasks emulator started "
            f"with `latency_ms={LATENCY_MS}` (`--latency-ms`): every RPC waits {LATENCY_MS} ms "
            "in the emulator before it is handled, because a Cloud Tasks round trip from App "
            "Engine takes tens of ms while a local emulator answers in well under 1 ms, and "
            "fan-out is about overlapping or saving those waits. Delayed RPCs wait in parallel "
            f"in the emulator's pool of {LATENCY_RPC_WORKERS} threads (more than the batch's "
            f"{CONCURRENCY}, so the pool does not cap it). A sequential `defer()` loop (one "
            f"CreateTask per task) vs `batch(concurrency={CONCURRENCY})` (one BatchCreateTasks "
            f"per {BATCH_CREATE_MAX} tasks of a queue, {CONCURRENCY} calls in flight), then "
            f"`batch()` of {wide:,} tasks spread over {len(WIDE_QUEUES)} queues. One run each, "
            "loop first; RPCs counted at the emulator; the time includes preparing the calls."
        ),
        columns=["variant", "tasks", "seconds", "tasks/s", "RPCs"],
    )
    section.rows += [
        _row("defer() loop", count, loop, loop_rpcs),
        _row("batch()", count, batched, batch_rpcs),
        _row(f"batch(), {len(WIDE_QUEUES)} queues", wide, spread, wide_rpcs),
    ]
    section.targets.append(
        ratio_target("batch() speed-up over the loop", speedup, TARGET, at_least=True)
    )
    section.data = {
        "loop_s": loop,
        "batch_s": batched,
        "wide_s": spread,
        "count": count,
        "wide_count": wide,
        "latency_ms": LATENCY_MS,
        "rpcs": {"loop": loop_rpcs, "batch": batch_rpcs, "wide": wide_rpcs},
    }
    return section


def _batch(count: int, queues: list[str]) -> None:
    with batch(concurrency=CONCURRENCY) as fan_out:
        for number in range(count):
            fan_out.defer(tasks.add, number, 2, _queue=queues[number % len(queues)])


def _batch_calls(count: int, queues: int) -> int:
    """BatchCreateTasks calls for ``count`` tasks dealt round-robin over ``queues`` queues."""
    sizes = [len(range(queue, count, queues)) for queue in range(queues)]
    return sum(-(-size // BATCH_CREATE_MAX) for size in sizes)


def _rpcs(emulator: CloudTasksEmulator) -> dict[str, int]:
    """The task-creating RPCs since the last call, by method (and the counts reset)."""
    counts = {
        method: emulator.rpc_counts[method]
        for method in ("CreateTask", "BatchCreateTasks")
        if emulator.rpc_counts[method]
    }
    emulator.reset_counts()
    return counts


def _check_rpcs(counted: dict[str, int], expected: dict[str, int]) -> None:
    if counted != expected:
        raise RuntimeError(f"expected RPCs {expected}, counted {counted}")


def _row(variant: str, count: int, seconds: float, rpcs: dict[str, int]) -> list[str]:
    calls = ", ".join(f"{number:,} {method}" for method, number in rpcs.items())
    return [variant, f"{count:,}", f"{seconds:.2f}", f"{count / seconds:,.0f}", calls]


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
