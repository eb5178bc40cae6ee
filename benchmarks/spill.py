"""Benchmark 3: Datastore and Cloud Tasks RPCs of a spilled task, defer and run.

Both emulators run in-process (real gRPC servers); gae_deferred uses the real ndb client and
CloudTasksClient through ``DATASTORE_EMULATOR_HOST`` / ``CLOUD_TASKS_EMULATOR_HOST``. The queue
is paused, so the emulator never dispatches: the benchmark fetches the task body with GetTask
and runs it through the webapp2 handler in-process, counting RPCs at the emulators.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

import grpc
import webapp2

from gae_deferred import cloud_tasks, defer, envelope, idempotent, reset_clients, spillover
from gae_deferred._config import CHUNK_MUTATION_OVERHEAD, DATASTORE_REQUEST_LIMIT, settings
from gae_deferred.local.cloudtasks import CloudTasksEmulator
from gae_deferred.local.datastore import DatastoreEmulator
from gae_deferred.webapp2 import deferred_routes

from . import floor, tasks
from ._setup import BENCH_PROJECT
from .report import Section, Target, count_target, ratio_target

MB = 1_000_000
MIB = 1024 * 1024
QUEUE_YAML = """\
queue:
- name: bench-paused
  rate: 0/s
"""


def _chunks_per_commit() -> int:
    """Whole chunks one Commit request of ``commit_bytes`` holds (3 at the defaults)."""
    current = settings()
    return (current.commit_bytes - CHUNK_MUTATION_OVERHEAD) // current.chunk_bytes


def _expected_writes(chunks: int) -> int:
    return -(-chunks // _chunks_per_commit())


class SizingEmulator(DatastoreEmulator):
    """The emulator, keeping the largest request and response bytes of every RPC."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.largest_request = 0
        self.largest_response = 0

    def reset_sizes(self) -> None:
        self.largest_request = self.largest_response = 0

    def _method_handler(self, name, request_type, service, state) -> grpc.RpcMethodHandler:
        inner = super()._method_handler(name, request_type, service, state).unary_unary

        def sized(raw: bytes, context: grpc.ServicerContext) -> bytes:
            self.largest_request = max(self.largest_request, len(raw))
            response = inner(raw, context)
            self.largest_response = max(self.largest_response, len(response))
            return response

        return grpc.unary_unary_rpc_method_handler(sized)


#: docs/design.md: no Lookup response over gRPC's default 4 MiB receive limit, which ndb's
#: production channel keeps: whole chunks of at most 4 MiB - 1 MiB (the record) - 64 KiB each.
LOOKUP_CHUNK_BYTES = 4 * 1024 * 1024 - 1024 * 1024 - 64 * 1024


def _expected_lookups(chunks: int, stored_bytes: int) -> int:
    """1 when the whole payload fits; else as few as hold whole chunks of that size each."""
    if stored_bytes <= LOOKUP_CHUNK_BYTES:
        return 1
    return -(-chunks // (LOOKUP_CHUNK_BYTES // settings().chunk_bytes))


@idempotent
def idempotent_add(a: int, b: int) -> int:
    """benchmarks.tasks.add behind @idempotent: its claim and done marker are what is measured."""
    return tasks.add(a, b)


def _idempotent_claim(section: Section, app, datastore, rounds: int) -> None:
    """An inline task calling an @idempotent function against the same call without it:
    Datastore RPCs (the claim's transaction and the done marker; none without) and the
    median wall time of a run through the handler, interleaved."""
    samples: dict[str, list[float]] = {"plain": [], "idempotent": []}
    counts: dict[str, int] = {}
    for number in range(rounds):
        for variant, function in (("plain", tasks.add), ("idempotent", idempotent_add)):
            name = f"bench-{variant}-{number}"
            body = envelope.build(function, (1, 2), task=name, queue="bench-paused")
            environ = floor.environ_factory(
                body, HTTP_X_APPENGINE_QUEUENAME="bench-paused", HTTP_X_APPENGINE_TASKNAME=name
            )()
            datastore.reset_counts()
            started = time.perf_counter()
            status = floor.call_wsgi(app, environ)
            samples[variant].append(time.perf_counter() - started)
            if not status.startswith("200"):
                raise RuntimeError(f"{variant} task answered {status}")
            if variant == "idempotent":
                counts = dict(datastore.rpc_counts)
    plain_ms, idem_ms = (sorted(samples[v])[rounds // 2] * 1e3 for v in ("plain", "idempotent"))
    rpcs = sum(counts.values())
    section.targets.append(
        count_target("@idempotent run: Datastore RPCs (claim transaction + done marker)", rpcs, 4)
    )
    section.notes.append(
        f"@idempotent: an inline task calling an `@idempotent` function, {rounds} interleaved "
        f"rounds, medians: {idem_ms:.1f} ms per run against {plain_ms:.1f} ms without it; "
        f"its Datastore RPCs {counts} (the claim: BeginTransaction, Lookup, Commit; then the "
        "done marker's Commit). The claim alone is 3 of those 4 RPCs."
    )
    section.data["idempotent"] = {"samples": samples, "rpcs": counts}


def _clients_reset() -> None:
    reset_clients()


def run(*, quick: bool) -> Section:
    """Defer and run spilled payloads of 600 KB, 5 MB, 8 MiB and 20 MB (quick: 600 KB, 5 MB)."""
    sizes = [600_000, 5 * MB] if quick else [600_000, 5 * MB, 8 * MIB, 20 * MB]
    section = Section(
        key="spill",
        title="Spill path RPCs",
        what=(
            "RPCs counted at the in-process emulators (real ndb and CloudTasksClient) for one "
            "spilled task per size: incompressible payloads (random bytes) passed to a module "
            "function; `defer()` into a paused queue, then the task body from GetTask run "
            "through the webapp2 handler in-process. No Datastore RPC may exceed 4 MiB "
            "(4,194,304 bytes) either way: Datastore and Google's emulators refuse a bigger "
            "request, and gRPC's default receive limit, which ndb's production channel keeps, "
            "a bigger response. Datastore chunks are 1,000,000 bytes; a Commit request carries "
            "at most `commit_bytes` (3 MiB: 3 chunks), the record in the last. The run reads "
            "whole chunks of at most 3,080,192 bytes per Lookup (3 chunks), the record with the "
            "first: no response may exceed gRPC's default 4 MiB receive limit, which ndb's "
            "production channel keeps (it lifts it only for the emulator). Before the call the "
            "run takes its claim on the payload (a duplicate delivery meanwhile is answered 503 "
            "instead of running it twice): one transaction, BeginTransaction + Lookup of the "
            "record + Commit of the claim, counted in the run's RPCs and timed as `claim ms`; "
            "an `@idempotent` function's claim is the same transaction on its marker. Largest "
            "request / response: bytes of the biggest Datastore RPC of the defer and the run, "
            "measured at the emulator."
        ),
        columns=[
            "payload",
            "chunks",
            "defer: DS commits",
            "defer: CreateTask",
            "defer: other RPCs",
            "run: Lookup",
            "run: Commit",
            "run: other",
            "largest request",
            "largest response",
            "defer ms",
            "run ms",
            "claim ms",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="bench-spill-") as tmp:
        queue_yaml = pathlib.Path(tmp) / "queue.yaml"
        queue_yaml.write_text(QUEUE_YAML, encoding="utf-8")
        datastore = SizingEmulator(port=0).start()
        cloudtasks = CloudTasksEmulator(
            port=0,
            queue_yaml=str(queue_yaml),
            project=BENCH_PROJECT,
            app_url="http://127.0.0.1:9",
        ).start()
        os.environ["DATASTORE_EMULATOR_HOST"] = datastore.address
        os.environ["CLOUD_TASKS_EMULATOR_HOST"] = f"127.0.0.1:{cloudtasks.port}"
        _clients_reset()
        try:
            app = webapp2.WSGIApplication(deferred_routes())
            defer(tasks.consume, b"warm-up", _queue="bench-paused")
            for size in sizes:
                _one(section, app, datastore, cloudtasks, size)
            _idempotent_claim(section, app, datastore, 10 if quick else 40)
            _against_put_multi(section, 3 if quick else 7)
        finally:
            cloudtasks.stop()
            datastore.stop()
            os.environ.pop("DATASTORE_EMULATOR_HOST", None)
            os.environ.pop("CLOUD_TASKS_EMULATOR_HOST", None)
            _clients_reset()
    return section


def _one(section: Section, app, datastore, cloudtasks, size: int) -> None:
    payload = os.urandom(size)
    datastore.reset_counts()
    datastore.reset_sizes()
    cloudtasks.reset_counts()
    started = time.perf_counter()
    task = defer(tasks.consume, payload, _queue="bench-paused")
    defer_ms = (time.perf_counter() - started) * 1e3
    ds_defer, ct_defer = dict(datastore.rpc_counts), dict(cloudtasks.rpc_counts)
    body = (
        cloud_tasks.client()
        .get_task(request={"name": task.path, "response_view": "FULL"})
        .app_engine_http_request.body
    )
    datastore.reset_counts()
    environ = floor.environ_factory(
        body,
        HTTP_X_APPENGINE_QUEUENAME=task.queue,
        HTTP_X_APPENGINE_TASKNAME=task.name,
    )()
    claims: list[float] = []
    take = spillover.claim

    def timed_claim(*args, **kwargs):
        began = time.perf_counter()
        try:
            return take(*args, **kwargs)
        finally:
            claims.append((time.perf_counter() - began) * 1e3)

    spillover.claim = timed_claim
    started = time.perf_counter()
    try:
        status = floor.call_wsgi(app, environ)
    finally:
        spillover.claim = take
    run_ms = (time.perf_counter() - started) * 1e3
    if not status.startswith("200"):
        raise RuntimeError(f"spilled task of {size:,} bytes answered {status}")
    ds_run = dict(datastore.rpc_counts)
    commits = ds_defer.pop("Commit", 0)
    creates = ct_defer.pop("CreateTask", 0)
    lookups, deletes = ds_run.pop("Lookup", 0), ds_run.pop("Commit", 0)
    begins = ds_run.pop("BeginTransaction", 0)
    other_defer = sum(ds_defer.values()) + sum(ct_defer.values())
    label = f"{size / MIB:g} MiB" if size % MIB == 0 else f"{size / MB:g} MB"
    section.rows.append(
        [
            label,
            str(task.chunks),
            str(commits),
            str(creates),
            str(other_defer),
            str(lookups),
            str(deletes),
            str(sum(ds_run.values()) + begins),
            f"{datastore.largest_request:,}",
            f"{datastore.largest_response:,}",
            f"{defer_ms:.0f}",
            f"{run_ms:.0f}",
            f"{sum(claims):.1f}",
        ]
    )
    expected = _expected_writes(task.chunks)
    per_commit = _chunks_per_commit()
    note = "" if expected == 1 else f" ({task.chunks} chunks: 1 commit per {per_commit} chunks)"
    section.targets.append(
        count_target(f"{label} defer: Datastore commits{note}", commits, expected)
    )
    section.targets.append(count_target(f"{label} defer: CreateTask", creates, 1))
    section.targets.append(count_target(f"{label} defer: other RPCs", other_defer, 0))
    lookups_expected = _expected_lookups(task.chunks, task.stored_bytes)
    per_lookup = LOOKUP_CHUNK_BYTES // settings().chunk_bytes
    lookup_note = "" if lookups_expected == 1 else f" (1 Lookup per {per_lookup} chunks)"
    section.targets.append(
        count_target(
            f"{label} run: Lookup{lookup_note} + 1 (the claim's)", lookups, lookups_expected + 1
        )
    )
    section.targets.append(count_target(f"{label} run: Commit (claim, delete)", deletes, 2))
    section.targets.append(count_target(f"{label} run: BeginTransaction (claim)", begins, 1))
    section.targets.append(count_target(f"{label} run: other RPCs", sum(ds_run.values()), 0))
    largest = max(datastore.largest_request, datastore.largest_response)
    section.targets.append(
        Target(
            f"{label}: largest Datastore request or response, bytes",
            f"{largest:,}",
            f"≤ {DATASTORE_REQUEST_LIMIT:,}",
            largest <= DATASTORE_REQUEST_LIMIT,
        )
    )
    section.data[label] = {
        "defer": ds_defer | ct_defer,
        "run": ds_run | {"BeginTransaction": begins},
        "chunks": task.chunks,
        "claim_ms": sum(claims),
        "largest_request": datastore.largest_request,
        "largest_response": datastore.largest_response,
    }


#: defer() of a 5 MB spilled payload against google-cloud-datastore's put_multi of the same chunks.
FLOOR_BUDGET = 2.0
FLOOR_SIZE = 5 * MB


def _against_put_multi(section: Section, rounds: int) -> None:
    """Interleaved wall time of defer(5 MB) (2 commits + CreateTask) and of plain
    google-cloud-datastore ``put_multi`` calls of the same chunk entities, as many a call as
    one request of ``commit_bytes`` holds (2 commits: none may exceed 4 MiB): the floor of
    writing those bytes from Python through the same emulator."""
    from google.cloud import datastore as cloud_datastore

    from gae_deferred import envelope

    client = cloud_datastore.Client(project=BENCH_PROJECT)
    payload = os.urandom(FLOOR_SIZE)
    chunk_bytes = settings().chunk_bytes
    data = envelope.build(tasks.consume, (payload,))
    parent = client.key("_BenchPayload", "floor")

    def put_multi() -> None:
        entities = []
        for number, start in enumerate(range(0, len(data), chunk_bytes), 1):
            entity = cloud_datastore.Entity(
                client.key("_BenchPayloadChunk", number, parent=parent),
                exclude_from_indexes=("data",),
            )
            entity["data"] = data[start : start + chunk_bytes]
            entities.append(entity)
        per_commit = _chunks_per_commit()
        for first in range(0, len(entities), per_commit):
            client.put_multi(entities[first : first + per_commit])

    def ours() -> None:
        defer(tasks.consume, payload, _queue="bench-paused")

    put_multi()
    ours()
    samples: dict[str, list[float]] = {"put_multi": [], "defer": []}
    for index in range(rounds):
        order = (("put_multi", put_multi), ("defer", ours))
        for name, call in order if index % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - started)
    ratios = sorted(a / b for a, b in zip(samples["defer"], samples["put_multi"], strict=True))
    ratio = ratios[len(ratios) // 2]
    floor_ms = sorted(samples["put_multi"])[rounds // 2] * 1e3
    ours_ms = sorted(samples["defer"])[rounds // 2] * 1e3
    section.targets.append(
        ratio_target(
            "5 MB defer vs google-cloud-datastore put_multi of its chunks", ratio, FLOOR_BUDGET
        )
    )
    chunks = -(-len(data) // chunk_bytes)
    commits = _expected_writes(chunks)
    section.notes.append(
        f"5 MB defer() vs the floor, {rounds} interleaved rounds, wall-time medians (both "
        f"emulators in this process, so their CPU counts on both sides): google-cloud-datastore "
        f"put_multi of the same {chunks} chunks, {commits} commits, {floor_ms:.0f} ms, "
        f"defer() {ours_ms:.0f} ms ({commits} Commits + 1 CreateTask), ratio {ratio:.2f}x "
        f"(budget ≤ {FLOOR_BUDGET:g}x)"
    )
    section.data["put_multi floor"] = samples
