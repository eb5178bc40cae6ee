"""Benchmark 6: dashboard list pages at 100, 1,000 and 10,000 records.

Records are written directly with ndb (``spillover.build_record`` + ``spillover.write_many``
with one chunk each, ``failures.update`` + put) into an in-process Datastore emulator whose RPC
handlers are wrapped to count response bytes of Lookup/RunQuery and whether any response carries a
``_DeferredPayloadChunk`` entity. Pages are in-process WSGI GETs from loopback in local mode.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time

import grpc
import webapp2
from google.cloud import ndb

import gae_deferred
from gae_deferred import FailureState, _datastore, failures, spillover
from gae_deferred.local.datastore import DatastoreEmulator
from gae_deferred.webapp2 import deferred_routes

from . import floor
from .report import Section, count_target, ratio_target

PAGES = (
    "/_ah/deferred-admin/spillover",
    "/_ah/deferred-admin/failures",
    "/_ah/deferred-admin/failures/list",
    "/_ah/deferred-admin/api/spillover",
    "/_ah/deferred-admin/api/failures",
)
CHUNK_KIND = b"_DeferredPayloadChunk"
TARGET = 3.0


class CountingEmulator(DatastoreEmulator):
    """The emulator, counting response bytes of reads and reads that return payload chunks."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.read_bytes = 0
        self.chunk_reads = 0

    def _method_handler(self, name, request_type, service, state) -> grpc.RpcMethodHandler:
        handler = super()._method_handler(name, request_type, service, state)
        if name not in ("Lookup", "RunQuery"):
            return handler
        inner = handler.unary_unary

        def counted(raw: bytes, context: grpc.ServicerContext) -> bytes:
            response = inner(raw, context)
            self.read_bytes += len(response)
            self.chunk_reads += CHUNK_KIND in response
            return response

        return grpc.unary_unary_rpc_method_handler(counted)


def _populate(total: int, have: int) -> None:
    """Add records until there are ``total`` spilled and ``total`` failure records."""
    now = datetime.datetime.now(datetime.UTC)
    batch: list[ndb.Model] = []
    # Every failure is in one group: its entity goes once per commit (Datastore refuses the
    # same key twice in a non-transactional commit).
    groups: dict[ndb.Key, ndb.Model] = {}
    for number in range(have, total):
        payload_id = f"bench{number:06d}"
        envelope = gae_deferred.serialize(floor.FloorHandler.post, number, b"x" * 2000)
        header = gae_deferred.envelope.read_header(envelope)
        record, chunks = spillover.build_record(
            payload_id,
            envelope,
            header,
            queue="default",
            task_name=f"d-{payload_id}",
            eta=now,
            task={"url": "/_ah/queue/deferred", "headers": {}, "routing": {}},
        )
        batch += [*chunks, record]
        failure = failures.update(
            None,
            failures.failure_id("default", f"task-{number}"),
            function="benchmarks.tasks.add",
            exception_type="ValueError",
            message=f"bad value {number}",
            traceback="Traceback (most recent call last):\n  ...\nValueError\n" * 20,
            state=FailureState.RETRYING,
            task_name=f"task-{number}",
            queue="default",
            meta=header,
            payload_id=payload_id,
            when=now,
        )
        batch.append(failure)
        group = failures.group_entity(failure)
        groups[group.key] = group
        if len(batch) >= 600:
            ndb.put_multi([*batch, *groups.values()])
            batch, groups = [], {}
    if batch:
        ndb.put_multi([*batch, *groups.values()])


def run(*, quick: bool) -> Section:
    sizes = (100, 1000) if quick else (100, 1000, 10_000)
    repeats = 3 if quick else 7
    emulator = CountingEmulator(port=0).start()
    os.environ["DATASTORE_EMULATOR_HOST"] = emulator.address
    gae_deferred.reset_clients()
    gae_deferred.configure(local_mode=True)
    app = webapp2.WSGIApplication(deferred_routes())
    section = Section(
        key="dashboard",
        title="Dashboard scaling",
        what=(
            "Wall ms per page (in-process WSGI GET from 127.0.0.1 in local mode, Datastore "
            "emulator in-process over gRPC) with N spilled payloads (one 1-chunk payload each) "
            "and N failure records; Datastore bytes read = response bytes of Lookup/RunQuery "
            f"at the emulator; median of {repeats} interleaved requests per page after warm-up."
        ),
        columns=[
            "page",
            *[f"ms @ {n:,}" for n in sizes],
            *[f"DS KB read @ {n:,}" for n in sizes],
            "chunk reads",
        ],
    )
    results: dict[str, dict[int, tuple[float, int]]] = {page: {} for page in PAGES}
    chunk_reads = 0
    try:
        have = 0
        client = _datastore.client()
        for size in sizes:
            with client.context():
                _populate(size, have)
            have = size
            for page in PAGES:
                _get(app, page)
            samples: dict[str, list[float]] = {page: [] for page in PAGES}
            reads: dict[str, int] = {}
            for index in range(repeats):
                for page in PAGES if index % 2 == 0 else PAGES[::-1]:
                    before_bytes, before_chunks = emulator.read_bytes, emulator.chunk_reads
                    started = time.perf_counter()
                    _get(app, page)
                    samples[page].append(time.perf_counter() - started)
                    reads[page] = emulator.read_bytes - before_bytes
                    chunk_reads += emulator.chunk_reads - before_chunks
            for page in PAGES:
                results[page][size] = (statistics.median(samples[page]), reads[page])
    finally:
        emulator.stop()
        os.environ.pop("DATASTORE_EMULATOR_HOST", None)
        gae_deferred.reset_clients()
    for page in PAGES:
        row = [page.removeprefix("/_ah/deferred-admin")]
        row += [f"{results[page][n][0] * 1e3:.1f}" for n in sizes]
        row += [f"{results[page][n][1] / 1024:.1f}" for n in sizes]
        row.append("0" if chunk_reads == 0 else "see targets")
        section.rows.append(row)
        growth = results[page][sizes[-1]][0] / results[page][sizes[0]][0]
        section.targets.append(
            ratio_target(f"{row[0]}: time({sizes[-1]:,}) / time({sizes[0]:,})", growth, TARGET)
        )
    section.targets.append(count_target("reads returning _DeferredPayloadChunk", chunk_reads, 0))
    section.data = {page: {str(n): v for n, v in by.items()} for page, by in results.items()}
    section.data["plot"] = {
        page.removeprefix("/_ah/deferred-admin"): [(n, results[page][n][0] * 1e3) for n in sizes]
        for page in PAGES
    }
    return section


def _get(app: webapp2.WSGIApplication, path: str) -> None:
    environ = webapp2.Request.blank(path, remote_addr="127.0.0.1").environ
    status = floor.call_wsgi(app, environ)
    if not status.startswith("200"):
        raise RuntimeError(f"GET {path} answered {status}")
