"""Benchmark: iterate() against a plain ndb query + fn loop; its Datastore RPCs; shard balance.

1. Throughput on the local stack (``LocalStack``: both emulators as processes, gunicorn
   ``main:app`` with 2 workers x 4 threads, tasks dispatched by the Cloud Tasks emulator):
   entities/s of ``iterate(query, touch, shards=8)`` from the call to the job's finish, against
   ``for entity in query: touch(entity)`` in this one process, over the same entities of the
   stack's Datastore emulator. ``touch`` waits :data:`IO_WAIT` seconds (the call to another
   service a backfill makes: a mail, an index, an HTTP API) and puts the entity.
2. Datastore RPCs per 1,000 entities, counted at an in-process emulator while
   ``capture_tasks()`` runs a job whose fn does nothing: iterate()'s own cost (planning, the
   batch queries, the progress commits, the chain's spilled task payloads), against the
   plain loop's query pages.
3. Shard balance: the largest shard over the mean for 8 shards, with splits from a
   ``__scatter__`` sample and from the keys read keys-only, on the in-process emulator
   (which, like Google's emulators, keeps no ``__scatter__``: the sample is empty).

The stack's app imports this module for ``touch`` and ``BenchEntity``.
"""

from __future__ import annotations

import bisect
import itertools
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

from google.cloud import ndb

from gae_deferred import iterate, reset_clients

from ._setup import BENCH_PROJECT, ROOT, forget_stack_env
from .report import Section, ratio_target

#: Seconds ``touch`` waits per entity, as a call to another service would.
IO_WAIT = 0.01
SHARDS = 8
BATCH_SIZE = 50
TARGET = 1.0


class BenchEntity(ndb.Model):
    """The entities the benchmark walks; ``touched`` counts the visits."""

    touched = ndb.IntegerProperty(default=0)


def touch(entity: BenchEntity) -> None:
    """The per-entity fn: wait like a call to another service, then put the entity."""
    time.sleep(IO_WAIT)
    entity.touched += 1
    entity.put()


def nothing(batch: list[Any]) -> None:
    """The fn of the RPC count: iterate()'s own cost only."""


def run(*, quick: bool) -> Section:
    count = 160 if quick else 2000
    with tempfile.TemporaryDirectory(prefix="bench-iterate-") as tmp:
        loop_rate, job_rate = _throughput(pathlib.Path(tmp), count)
    rpc_count = 400 if quick else 2000
    rpcs, loop_rpcs, balance = _rpcs_and_balance(rpc_count)
    speedup = job_rate / loop_rate
    section = Section(
        key="iterate",
        title="iterate(): sharded jobs vs a query loop",
        what=(
            f"Entities/s over {count:,} entities of the local stack's Datastore emulator: "
            f"`iterate(query, touch, shards={SHARDS}, batch_size={BATCH_SIZE})` run by the "
            "stack (Cloud Tasks emulator dispatching to gunicorn `main:app`, 2 workers x 4 "
            "threads), timed from the call to the job's finish, against a plain "
            "`for entity in query: touch(entity)` loop in one process. `touch` waits "
            f"{IO_WAIT * 1000:.0f} ms (the call to another service a backfill makes) and puts "
            "the entity. Datastore RPCs per 1,000 entities are counted at an in-process "
            f"emulator over {rpc_count:,} entities while `capture_tasks()` runs a job whose fn "
            "does nothing (iterate()'s own cost: planning, batch queries, progress commits, "
            "the spilled payloads of its tasks) and while the plain loop pages through the "
            "same query. Shard balance: the largest of 8 shards over the mean, splits from a "
            "`__scatter__` sample and from the keys read keys-only."
        ),
        columns=["variant", "entities/s", "Datastore RPCs per 1,000 entities"],
    )
    section.rows += [
        ["plain query + fn loop", f"{loop_rate:,.1f}", f"{loop_rpcs:,.1f}"],
        [f"iterate(), {SHARDS} shards", f"{job_rate:,.1f}", f"{rpcs:,.1f}"],
    ]
    section.targets.append(
        ratio_target(
            f"iterate() with {SHARDS} shards over the loop", speedup, TARGET, at_least=True
        )
    )
    for method, (samples, ratio) in balance.items():
        shown = f"{ratio:.2f}x" if ratio is not None else "no split"
        section.notes.append(
            f"Shard balance by {method}: {samples:,} keys sampled; largest shard / mean = {shown}."
        )
    section.data = {
        "count": count,
        "loop_rate": loop_rate,
        "job_rate": job_rate,
        "speedup": speedup,
        "rpcs_per_1000": rpcs,
        "loop_rpcs_per_1000": loop_rpcs,
        "balance": balance,
    }
    return section


def _throughput(base: pathlib.Path, count: int) -> tuple[float, float]:
    """(loop entities/s, iterate() entities/s) on a fresh local stack."""
    from gae_deferred import iteration
    from gae_deferred.local.stack import LocalStack

    stack = LocalStack(
        ROOT / "app.yaml", base / "stack", app_port=0, datastore_port=0, tasks_port=0
    )
    saved = os.environ.get("GAE_DEFERRED_SIGNING_KEY")
    try:
        stack.start()
        # The stack signs with its key file; a key in our environment would win over it.
        os.environ.pop("GAE_DEFERRED_SIGNING_KEY", None)
        os.environ.update({k: v for k, v in stack.env.items() if k != "PYTHONPATH"})
        reset_clients()
        client = ndb.Client(project=stack.env.get("GOOGLE_CLOUD_PROJECT"))
        with client.context(cache_policy=False, global_cache_policy=False):
            for start in range(0, count, 500):
                ndb.put_multi([BenchEntity() for _ in range(min(500, count - start))])
            query = BenchEntity.query()
            loop = _timed(lambda: [touch(entity) for entity in query])
            started = time.perf_counter()
            job = iterate(query, touch, shards=SHARDS, batch_size=BATCH_SIZE, name="bench")
            deadline = started + max(120.0, count * IO_WAIT * 4)
            while True:
                record = iteration.DeferredJob.get_by_id(job.id)
                if record.state == "done":
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"the job did not finish in time: {record.state}")
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            touched = [entity.touched for entity in query]
            if record.processed != count or set(touched) != {2}:
                raise RuntimeError(f"the job processed {record.processed} of {count} entities")
        return count / loop, count / elapsed
    finally:
        stack.stop()
        forget_stack_env()
        if saved is not None:
            os.environ["GAE_DEFERRED_SIGNING_KEY"] = saved
        reset_clients()


def _rpcs_and_balance(count: int) -> tuple[float, float, dict[str, tuple[int, float | None]]]:
    """(iterate() RPCs per 1,000 entities, the loop's, shard balance per split method)."""
    from gae_deferred.local.datastore import DatastoreEmulator
    from gae_deferred.testing import capture_tasks

    with DatastoreEmulator(port=0, index_yaml=ROOT / "index.yaml") as emulator:
        previous = os.environ.get("DATASTORE_EMULATOR_HOST")
        os.environ["DATASTORE_EMULATOR_HOST"] = emulator.address
        try:
            client = ndb.Client(project=BENCH_PROJECT)
            reset_clients()
            with client.context(cache_policy=False, global_cache_policy=False):
                keys: list[ndb.Key] = []
                for start in range(0, count, 500):
                    keys += ndb.put_multi([BenchEntity() for _ in range(min(500, count - start))])
                emulator.reset_counts()
                for _ in BenchEntity.query():
                    pass
                loop_rpcs = sum(emulator.rpc_counts.values())
                with capture_tasks(ndb_client=client, queue_yaml=ROOT / "queue.yaml") as queue:
                    emulator.reset_counts()
                    iterate(
                        BenchEntity.query(),
                        nothing,
                        batched=True,
                        shards=SHARDS,
                        batch_size=BATCH_SIZE,
                    )
                    queue.run_all()
                    rpcs = sum(emulator.rpc_counts.values())
                balance = _balance(keys)
        finally:
            if previous is None:
                os.environ.pop("DATASTORE_EMULATOR_HOST", None)
            else:
                os.environ["DATASTORE_EMULATOR_HOST"] = previous
            reset_clients()
    return rpcs * 1000 / count, loop_rpcs * 1000 / count, balance


def _balance(keys: list[ndb.Key]) -> dict[str, tuple[int, float | None]]:
    """Largest shard / mean for splits from a __scatter__ sample and from every key."""
    from gae_deferred import iteration

    ordered = sorted(keys)
    scatter = (
        ndb.Query(kind=BenchEntity._get_kind())
        .order(ndb.query.PropertyOrder("__scatter__"))
        .fetch(SHARDS * iteration.SCATTER_OVERSAMPLE, keys_only=True)
    )
    found: dict[str, tuple[int, float | None]] = {}
    for method, sample in (("__scatter__", sorted(scatter)), ("keys", ordered)):
        if len(sample) < SHARDS:
            found[method] = (len(sample), None)
            continue
        cuts = iteration._quantiles(sample, SHARDS)
        sizes = _shard_sizes(ordered, cuts)
        found[method] = (len(sample), max(sizes) / (len(ordered) / len(sizes)))
    return found


def _shard_sizes(ordered: list[ndb.Key], cuts: list[ndb.Key]) -> list[int]:
    bounds = [0, *(bisect.bisect_left(ordered, cut) for cut in cuts), len(ordered)]
    return [high - low for low, high in itertools.pairwise(bounds)]


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started
