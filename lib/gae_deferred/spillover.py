"""Payloads too big for a task live in Datastore until the task has run.

A spilled payload is one ``_DeferredPayload`` record — only the fields the dashboard lists and
sorts by — plus ``_DeferredPayloadChunk`` children holding the envelope bytes::

    record, chunks = build_record(payload_id, envelope_bytes, header, queue="reports",
                                  task_name="d-1f2e...", eta=eta, task=spec.to_json())
    write_many([(record, chunks)])                # commits of at most commit_bytes, record last
    record, data = load(payload_id, record.chunks)  # one Lookup per ~3 MiB
    finish(payload_id, record.chunks)             # one Commit: gone, and marked as done

A task whose payload is gone asks ``load`` why: a done marker means the task already ran (a
duplicate delivery); otherwise the payload was deleted or expired, or, for a reference younger
than a grace period, its commit is not visible yet (see execution.py).

Records of tasks that failed for good stay (state ``permanent`` or ``dead``, the words of the
failure registry) so they can be retriggered; records still ``pending`` long after their ETA are
re-enqueued by the sweeper.
"""

from __future__ import annotations

import ctypes
import datetime
import enum
import functools
import itertools
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from google.cloud import ndb

from . import _facets, _ndb_rpc, _outcome, envelope
from ._config import CHUNK_MUTATION_OVERHEAD, settings
from ._model import MAX_INDEXED_CHARS, DeferredModel, is_key_name, root_key
from .errors import (
    DuplicateDeliveryRunning,
    EnqueueOutcomeUnknown,
    PayloadTooLargeError,
    PermanentTaskFailure,
    SpilledPayloadMissing,
)

logger = logging.getLogger("gae_deferred")


class PayloadState(enum.StrEnum):
    """Where a spilled payload's task stands; the failure states use the same words."""

    #: Its task is queued (or about to be): nothing has failed.
    PENDING = "pending"
    #: An attempt failed; Cloud Tasks retries it.
    RETRYING = "retrying"
    #: PermanentTaskFailure, or a payload that cannot load: kept for a retrigger.
    PERMANENT = "permanent"
    #: The last allowed attempt failed: kept for a retrigger.
    DEAD = "dead"


class DeferredPayload(DeferredModel):
    """One spilled payload's listed fields; the bytes are in DeferredPayloadChunk children."""

    state = ndb.StringProperty(choices=list(PayloadState), default=PayloadState.PENDING)
    created = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    updated = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    eta = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    function = ndb.StringProperty()
    queue = ndb.StringProperty()
    task_name = ndb.StringProperty()
    payload_bytes = ndb.IntegerProperty()
    stored_bytes = ndb.IntegerProperty()
    chunks = ndb.IntegerProperty()
    attempts = ndb.IntegerProperty(default=0)
    transactional = ndb.BooleanProperty(default=False)
    #: The envelope header (function, args preview, versions): what the detail page shows.
    meta = ndb.JsonProperty(indexed=False)
    #: What recreates the same task: url, headers, routing.
    task = ndb.JsonProperty(indexed=False)
    #: The running delivery's claim ("<task name> <random token>") and when it ends: a
    #: duplicate delivery meanwhile does not run (see ``claim``). Cleared when an attempt fails.
    claim = ndb.TextProperty()
    claimed_until = ndb.DateTimeProperty(tzinfo=datetime.UTC, indexed=False)
    #: Search tokens (state, queue, function prefixes): the dashboard's filters (see _facets).
    facets = ndb.ComputedProperty(
        lambda record: _facets.facets(
            state=record.state,
            queue=record.queue,
            function=record.function,
            namespace=record.namespace,
        ),
        repeated=True,
    )
    #: -created in ms, for "newest first within a time range" (see admin.SpillFilter).
    created_desc = ndb.ComputedProperty(lambda record: _facets.descending_ms(record.created))

    @property
    def id(self) -> str:
        return self.key.id()

    @property
    def namespace(self) -> str:
        """The Datastore namespace the task runs in (``""``: the default one)."""
        return str((self.meta or {}).get("namespace") or "")


class DeferredPayloadChunk(DeferredModel):
    """Up to chunk_bytes of a spilled envelope; chunk n has integer id n (1-based)."""

    data = ndb.BlobProperty(indexed=False)


class DeferredPayloadDone(DeferredModel):
    """Left behind by a spilled task that succeeded (same id as its record), so a duplicate
    delivery is recognised as one; the sweeper purges markers after DONE_MARKER_DAYS."""

    done = ndb.DateTimeProperty(tzinfo=datetime.UTC)


#: How long done markers are kept: Cloud Tasks redelivers within its retry backoff (hours).
DONE_MARKER_DAYS = 7


def new_payload_id() -> str:
    """A client-made id, so the task name and chunk keys are known before any RPC."""
    return uuid.uuid4().hex


def payload_key(payload_id: str) -> ndb.Key:
    return root_key(DeferredPayload, payload_id)


def done_key(payload_id: str) -> ndb.Key:
    return root_key(DeferredPayloadDone, payload_id)


def reference(record: DeferredPayload, **changes: Any) -> bytes:
    """The task body of a spilled record: its header and where the payload is, bound to the
    record's task (``changes`` override, e.g. a retrigger's ``failure_id``); ``parse_ref``
    reads it back."""
    return envelope.build_reference(
        record.meta or {},
        {"id": record.key.id(), "chunks": record.chunks, "stored_bytes": record.stored_bytes},
        task=record.task_name,
        queue=record.queue,
        **changes,
    )


def parse_ref(header: dict[str, Any]) -> tuple[str, int]:
    """``(payload id, chunk count)`` from a reference envelope's header.

    The header is signed, so a malformed ``ref`` is a bug or a key leak, never a transient
    state: PermanentTaskFailure, answered 200 and recorded.
    """
    ref = header.get("ref")
    payload_id = ref.get("id") if isinstance(ref, dict) else None
    chunks = ref.get("chunks") if isinstance(ref, dict) else None
    if (
        not is_key_name(payload_id)
        or len(payload_id) > MAX_INDEXED_CHARS
        or isinstance(chunks, bool)
        or not isinstance(chunks, int)
        or not 0 < chunks <= _max_chunks()
    ):
        raise PermanentTaskFailure(f"malformed spilled-payload reference: {str(ref)[:200]}")
    return payload_id, chunks


def _max_chunks() -> int:
    current = settings()
    return -(-current.max_payload_bytes // current.chunk_bytes)


def chunk_keys(payload_id: str, chunks: int) -> list[ndb.Key]:
    return _chunk_keys(payload_id, range(1, chunks + 1))


class PayloadChunks(Sequence[DeferredPayloadChunk]):
    """A spilled envelope's chunk entities, made from the envelope only as they are written.

    The commits build each chunk's protobuf straight from a view of the envelope
    (``blobs()``), so no chunk is ever held as bytes of its own besides the one being copied
    in: defer() of a 32 MiB payload holds the payload, the envelope (for a big argument, the
    same bytes: see envelope.Sealed) and one commit's request. Indexing or iterating makes
    DeferredPayloadChunk entities (copies), for code that wants them.
    """

    def __init__(self, payload_id: str, data: bytes | envelope.Sealed, chunk_bytes: int) -> None:
        self.keys = chunk_keys(payload_id, -(-len(data) // chunk_bytes))
        self._data = data
        self._chunk_bytes = chunk_bytes

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> DeferredPayloadChunk: ...

    @overload
    def __getitem__(self, index: slice) -> list[DeferredPayloadChunk]: ...

    def __getitem__(self, index: int | slice) -> DeferredPayloadChunk | list[DeferredPayloadChunk]:
        if isinstance(index, slice):
            return list(self)[index]
        number = range(len(self.keys))[index]  # IndexError past the end, as a list's
        data = next(itertools.islice(self._slices(), number, None))
        return DeferredPayloadChunk(key=self.keys[number], data=bytes(data))

    def __iter__(self) -> Iterator[DeferredPayloadChunk]:
        for key, data in zip(self.keys, self._slices(), strict=True):
            yield DeferredPayloadChunk(key=key, data=bytes(data))

    def blobs(self) -> Iterator[_ndb_rpc.Blob]:
        """Each chunk as what _ndb_rpc writes: its key and a view of its bytes."""
        for key, data in zip(self.keys, self._slices(), strict=True):
            yield _ndb_rpc.Blob(key, DeferredPayloadChunk, "data", data)

    def _slices(self) -> Iterator[bytes | memoryview]:
        return envelope.slices(self._data, self._chunk_bytes)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def check_size(data: bytes | envelope.Sealed, header: dict[str, Any]) -> None:
    """PayloadTooLargeError for an envelope over ``max_payload_bytes``."""
    limit = settings().max_payload_bytes
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"payload of {header.get('function')} is {len(data):,} bytes, over the "
            f"{limit:,} byte cap (max_payload_bytes)"
        )


def build_record(
    payload_id: str,
    data: bytes | envelope.Sealed,
    header: dict[str, Any],
    *,
    queue: str,
    task_name: str,
    eta: datetime.datetime,
    task: dict[str, Any],
    transactional: bool = False,
) -> tuple[DeferredPayload, PayloadChunks]:
    """The record and chunk entities for a payload, not yet written (the chunks are made from
    the envelope as they are written: see PayloadChunks)."""
    check_size(data, header)
    chunks = PayloadChunks(payload_id, data, settings().chunk_bytes)
    created = now()
    record = DeferredPayload(
        key=payload_key(payload_id),
        state=PayloadState.PENDING,
        created=created,
        updated=created,
        eta=eta,
        function=str(header.get("function", "?"))[:MAX_INDEXED_CHARS],
        queue=queue,
        task_name=task_name,
        payload_bytes=int(header.get("raw_bytes", len(data))),
        stored_bytes=len(data),
        chunks=len(chunks),
        transactional=transactional,
        meta=header,
        task=task,
    )
    return record, chunks


#: What write_many and write_in_transaction take: records and their chunks.
Payloads = list[tuple[DeferredPayload, Sequence[DeferredPayloadChunk]]]


def write_many(payloads: Payloads) -> None:
    """Write records and their chunks in as few commits as Datastore allows.

    Each Commit request is at most ``commit_bytes`` (at most 4 MiB, the largest request
    Datastore accepts) and 500 mutations. A payload's record is written last, in the commit of
    its last chunk or a later one, so a record never points at chunks that were not written. A
    payload that takes more than one commit gets a write marker in the commit of its first
    chunks, deleted by the commit of its record: a crash in between leaves the marker, and the
    sweeper deletes the chunks it names (``purge_unfinished``). If a commit fails, what was
    written is deleted again; when even that fails for a record, EnqueueOutcomeUnknown says the
    sweeper will enqueue it. Always outside any transaction (see ``write_in_transaction``); the
    commits bypass ``ndb.put_multi``, whose debug strings cost more than the write itself
    (see _ndb_rpc).
    """
    _write(payloads, records=True)


def _write(payloads: Payloads, *, records: bool) -> list[ndb.Key]:
    """write_many, or with ``records=False`` the chunks alone, each payload with a write
    marker; returns the markers' keys that are still to be deleted (with the records)."""
    written: list[ndb.Key] = []
    sending: list[ndb.Key] = []
    try:
        for batch in _commits(payloads, records=records):
            sending = [mutation.key for mutation in batch if not mutation.delete]
            _ndb_rpc.commit_mutations(batch)
            written += sending
            sending = []
            del batch
            # One commit's request, its serialization and gRPC's copy of it are gone: hand
            # their memory back before the next commit builds its own.
            release_freed_memory()
    except Exception as exc:
        landed = _outcome.may_have_landed(exc)
        record_kind = DeferredPayload._get_kind()
        if landed and not any(key.kind() == record_kind for key in sending):
            # Only chunks may have landed, and no record points at them: nothing will run
            # them. Certain, then; they are deleted with the rest.
            _outcome.settled_as_not_stored(exc)
            landed, written = False, written + sending
        # A commit with a record that may have landed keeps what came before it: the caller
        # reads the record back to settle it (see _outcome).
        if written and not landed:
            _delete_written(written, exc)
        raise
    return [] if records else [write_key(record.key.id()) for record, _ in payloads]


def write_in_transaction(payloads: Payloads) -> None:
    """Add the records to the current transaction's commit, with their chunks when they fit
    in ``commit_bytes`` (the caller's own writes share that commit, and Datastore refuses a
    request over 4 MiB); else the chunks are written first, outside the transaction, in commits
    of their own with a write marker each, the transaction commits the records, and the markers
    are deleted once it has (not in it: a transaction that writes an entity changed since it
    began may abort). Chunks of a transaction that never commits are deleted by the sweeper."""
    limit = settings().commit_bytes
    chunk_bytes = sum(record.stored_bytes or 0 for record, _ in payloads)
    overhead = sum(len(chunks) for _, chunks in payloads) * CHUNK_MUTATION_OVERHEAD
    records = [_ndb_rpc.upsert(record).size for record, _ in payloads]
    if chunk_bytes + overhead + sum(records) <= limit:
        _ndb_rpc.join_transaction(
            upserts=[
                entity for record, chunks in payloads for entity in (*_writable(chunks), record)
            ]
        )
        return
    markers = ndb.non_transactional()(_write)(payloads, records=False)
    _ndb_rpc.join_transaction(upserts=[record for record, _ in payloads])
    ndb.get_context().call_on_commit(functools.partial(_forget_markers, markers))


def _forget_markers(markers: list[ndb.Key]) -> None:
    """After the transaction wrote the records: their write markers are done with. One left
    behind is only deleted later by the sweeper (its record keeps the chunks)."""
    try:
        _ndb_rpc.commit(deletes=markers)
    except Exception:
        logger.exception("could not delete %d write marker(s); the sweeper will", len(markers))


def _writable(
    chunks: Sequence[DeferredPayloadChunk],
) -> Iterator[DeferredPayloadChunk | _ndb_rpc.Blob]:
    """Chunks as the commits write them: views for PayloadChunks, else the entities."""
    return chunks.blobs() if isinstance(chunks, PayloadChunks) else iter(chunks)


def _commits(payloads: Payloads, *, records: bool = True) -> Iterator[list[_ndb_rpc.Mutation]]:
    """The commits' mutations, made one commit at a time (a chunk's view exists only from its
    commit on): each request at most ``commit_bytes`` and 500 mutations, room kept in each for
    the write marker of a payload that turns out to span commits."""
    head = len(_ndb_rpc.request_head(ndb.get_context().client))
    plan = _Commit(settings().commit_bytes - head - _MARKER_ROOM)
    started = now()
    for record, chunks in payloads:
        marker = _write_marker(record, started)
        spans = False  # whether the marker went into an earlier commit
        for chunk in _writable(chunks):
            mutation = _ndb_rpc.upsert(chunk)
            if not plan.fits(mutation.size):
                if plan.holds(record) and not spans:
                    plan.force(_ndb_rpc.upsert(marker))
                    spans = True
                yield plan.take()
            plan.add(mutation)
            del mutation
        if records:
            # The record, and the delete of its marker if the payload spans commits.
            tail = [_ndb_rpc.upsert(record), *([_ndb_rpc.delete(marker.key)] if spans else [])]
        else:
            tail = [] if spans else [_ndb_rpc.upsert(marker)]
        if tail and not plan.fits(sum(mutation.size for mutation in tail), len(tail)):
            if plan.holds(record) and not spans:
                plan.force(_ndb_rpc.upsert(marker))
                tail = [*tail[:1], _ndb_rpc.delete(marker.key)] if records else []
            yield plan.take()
        plan.add(*tail)
    if plan.batch:
        yield plan.take()


class _Commit:
    """The mutations of the commit being planned."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.batch: list[_ndb_rpc.Mutation] = []
        self.size = 0
        self._parents: set[str] = set()

    def fits(self, size: int, count: int = 1) -> bool:
        """Whether ``count`` mutations of ``size`` bytes fit (anything fits an empty commit)."""
        if not self.batch:
            return True
        return len(self.batch) + count < _COMMIT_ENTITIES and self.size + size <= self.limit

    def holds(self, record: DeferredPayload) -> bool:
        """Whether chunks of ``record`` are in this commit."""
        return record.key.id() in self._parents

    def add(self, *mutations: _ndb_rpc.Mutation) -> None:
        for mutation in mutations:
            self.batch.append(mutation)
            self.size += mutation.size
            parent = mutation.key.parent()
            if parent is not None:
                self._parents.add(parent.id())

    def force(self, mutation: _ndb_rpc.Mutation) -> None:
        """Add a write marker in the room kept for it."""
        self.batch.append(mutation)

    def take(self) -> list[_ndb_rpc.Mutation]:
        batch, self.batch, self.size, self._parents = self.batch, [], 0, set()
        return batch


#: Datastore's cap on mutations per commit.
_COMMIT_ENTITIES = 500
#: Room kept in each commit for a write marker's upsert (a key, a date and a number).
_MARKER_ROOM = 1024


class DeferredPayloadWrite(DeferredModel):
    """A payload whose chunks are being written in several commits (same id as its record):
    written with its first chunks, deleted with its record. One older than ``WRITE_GRACE``
    names chunks whose record never came (the process died between commits, or the
    transaction they were written for never committed); the sweeper deletes them."""

    started = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    chunks = ndb.IntegerProperty(indexed=False)


#: Longer than any write of a payload, or any transaction (Datastore ends them after 270 s).
WRITE_GRACE = datetime.timedelta(hours=1)


def write_key(payload_id: str) -> ndb.Key:
    return root_key(DeferredPayloadWrite, payload_id)


def _write_marker(record: DeferredPayload, started: datetime.datetime) -> DeferredPayloadWrite:
    return DeferredPayloadWrite(
        key=write_key(record.key.id()), started=started, chunks=record.chunks
    )


def purge_unfinished(now: datetime.datetime, batch: int) -> int:
    """Delete the chunks of payloads whose write never finished (write markers older than
    ``WRITE_GRACE``) and their markers; returns how many payloads that was."""
    cutoff = now - WRITE_GRACE
    markers = DeferredPayloadWrite.query(DeferredPayloadWrite.started < cutoff).fetch(batch)
    if not markers:
        return 0
    payload_ids = [marker.key.id() for marker in markers]
    stored = ndb.get_multi([payload_key(payload_id) for payload_id in payload_ids])
    doomed: list[ndb.Key] = []
    for marker, record in zip(markers, stored, strict=True):
        doomed.append(marker.key)
        if record is None:  # else a transaction wrote it, and its marker was left behind
            doomed += chunk_keys(marker.key.id(), marker.chunks or 0)
    ndb.delete_multi(doomed)
    return len(markers)


def _delete_written(keys: list[ndb.Key], cause: Exception) -> None:
    """Undo the commits of a failed write_many."""
    try:
        ndb.delete_multi(keys, timeout=settings().datastore_timeout_seconds)
    except Exception as exc:
        records = [key.id() for key in keys if key.kind() == DeferredPayload._get_kind()]
        if records:
            raise EnqueueOutcomeUnknown(
                f"storing spilled payloads failed ({cause}) after payload(s) {records} were "
                f"written, and they could not be deleted ({exc}): the sweeper will enqueue "
                "them, so do not defer them again"
            ) from cause
        # Chunks without a record run nothing; the write marker written with them (or a
        # single commit's failure, which wrote nothing) lets the sweeper delete them.
        logger.exception("could not delete %d orphaned payload chunks", len(keys))


#: gRPC's default limit on a received message. ndb's production channel keeps it (ndb lifts it
#: only on its emulator channel), so no Lookup response may be bigger, or the Lookup fails with
#: RESOURCE_EXHAUSTED (tests/test_ndb_rpc.py reads payloads through such a channel).
GRPC_RECEIVE_LIMIT = 4 * 1024 * 1024
#: Chunk bytes one Lookup reads: what fits under that limit beside the record (an entity of up
#: to 1 MiB, read by the first Lookup) and the protobuf framing. Smaller Lookups also keep the
#: run's memory low: one Lookup holds its response, the parsed response and the chunks' bytes at
#: once (docs/performance.md, "Memory of a spilled payload").
LOOKUP_BYTES = GRPC_RECEIVE_LIMIT - 1024 * 1024 - 64 * 1024


def lookup_groups(chunks: int, stored_bytes: int | None = None) -> list[range]:
    """The chunk numbers each Lookup of ``load`` reads: all of them in one up to
    ``LOOKUP_BYTES`` (``stored_bytes``, or chunks x chunk_bytes when unknown), else as many
    full chunks as fit in ``LOOKUP_BYTES`` per Lookup."""
    chunk_bytes = settings().chunk_bytes
    known = isinstance(stored_bytes, int) and not isinstance(stored_bytes, bool)
    total = stored_bytes if known else chunks * chunk_bytes
    if total <= LOOKUP_BYTES:
        return [range(1, chunks + 1)]
    per = max(1, LOOKUP_BYTES // chunk_bytes)
    return [range(first, min(first + per, chunks + 1)) for first in range(1, chunks + 1, per)]


def load(
    payload_id: str, chunks: int, stored_bytes: int | None = None
) -> tuple[DeferredPayload, bytearray]:
    """The record and the envelope bytes: one Lookup up to ``LOOKUP_BYTES``, else Lookups of
    at most that much each (see ``lookup_groups``; ``stored_bytes`` is the reference's).

    The bytes come back as one preallocated ``bytearray`` that every chunk is copied into and
    then dropped, Lookup by Lookup, so a 32 MiB payload is held once here plus one Lookup's
    worth instead of as chunks plus their join::

        record, data = load(payload_id, record.chunks, record.stored_bytes)
        envelope.open_envelope(data)   # verifies in place; the body is a view into ``data``

    Raises SpilledPayloadMissing, with ``already_ran`` set when a done marker says the task
    succeeded before (the first Lookup reads the marker).
    """
    groups = lookup_groups(chunks, stored_bytes)
    first = groups[0]
    found = _ndb_rpc.lookup(
        [payload_key(payload_id), done_key(payload_id), *_chunk_keys(payload_id, first)]
    )
    if found[0] is None:
        raise SpilledPayloadMissing(
            f"spilled payload {payload_id} is gone from Datastore", already_ran=found[1] is not None
        )
    record = _ndb_rpc.model_from_pb(found[0])
    pieces = found[2:]
    del found
    _check_present(payload_id, first, pieces)
    if len(groups) == 1:
        size = sum(len(_blob(piece)) for piece in pieces)
    else:
        # The record's own size: the later Lookups' chunks are not read yet.
        size = record.stored_bytes or 0
    data = bytearray(size)
    offset: int | None = 0
    with memoryview(data) as view:
        for numbers in groups:
            if numbers is not first:
                pieces = _ndb_rpc.lookup(_chunk_keys(payload_id, numbers))
                _check_present(payload_id, numbers, pieces)
            offset = _copy_into(view, offset, pieces)
            del pieces
            if offset is None:
                break
            if len(groups) > 1:
                release_freed_memory()
    if offset != size:
        raise SpilledPayloadMissing(
            f"spilled payload {payload_id} does not add up: its chunks are not the "
            f"{size:,} bytes its record says",
            record_found=True,
        )
    return record, data


def _blob(entity_pb: Any) -> bytes:
    """A chunk's bytes from its raw Entity protobuf (the ``data`` property)."""
    return entity_pb.properties["data"].blob_value


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        return None


def release_freed_memory() -> None:
    """Hand memory freed since the last call back to the OS, where the C library is glibc.

    glibc serves the ~1 MB buffers of a Lookup (response, parsed entities, chunk bytes) from
    its heaps once a freed buffer has raised its mmap threshold, and keeps them after they are
    freed: without this, each Lookup of a big payload leaves most of its buffers resident,
    and the next one does not fully reuse them.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _copy_into(view: memoryview, offset: int, pieces: list[Any]) -> int | None:
    """Copy each chunk's bytes into ``view`` from ``offset`` and drop the chunk; the new
    offset, or None when the chunks run past the end."""
    for index in range(len(pieces)):
        piece = _blob(pieces[index])
        pieces[index] = None  # this chunk's only reference: its response can go now
        end = offset + len(piece)
        if end > len(view):
            return None
        view[offset:end] = piece
        offset = end
    return offset


def _chunk_keys(payload_id: str, numbers: range) -> list[ndb.Key]:
    parent = payload_key(payload_id)
    return [ndb.Key(DeferredPayloadChunk, number, parent=parent) for number in numbers]


def _check_present(payload_id: str, numbers: range, pieces: list[Any]) -> None:
    missing = [number for number, piece in zip(numbers, pieces, strict=True) if piece is None]
    if missing:
        raise SpilledPayloadMissing(
            f"spilled payload {payload_id} lacks chunk(s) {missing}", record_found=True
        )


def claim(payload_id: str, task_name: str, token: str) -> DeferredPayload | None:
    """Take the claim on a spilled payload for one delivery of ``task_name``, in a transaction,
    before its call: the record, with ``claim=token`` until now + ``task_deadline_seconds``.

    None when the record belongs to another task now (see execution's "superseded").
    Raises DuplicateDeliveryRunning when another delivery's claim is still on, and
    SpilledPayloadMissing (``already_ran`` from the done marker) when the record is gone: a
    duplicate whose first delivery finished meanwhile.
    """

    def take() -> DeferredPayload | None:
        record, marker = ndb.get_multi([payload_key(payload_id), done_key(payload_id)])
        if record is None:
            raise SpilledPayloadMissing(
                f"spilled payload {payload_id} is gone from Datastore",
                already_ran=marker is not None,
            )
        if record.task_name and record.task_name != task_name:
            return None
        current = now()
        held = record.claim
        # A claim blocks only deliveries of the task that took it: a retrigger or the
        # sweeper's fresh task name is not held back by a crashed run of the old task.
        if (
            held is not None
            and held != f"{task_name} {token}"
            and held.split(" ", 1)[0] == task_name
            and (record.claimed_until or current) > current
        ):
            raise DuplicateDeliveryRunning(
                f"another delivery of task {task_name} is running payload {payload_id} (claimed "
                f"until {record.claimed_until:%H:%M:%S} UTC)"
            )
        record.claim = f"{task_name} {token}"
        record.claimed_until = current + datetime.timedelta(
            seconds=settings().task_deadline_seconds
        )
        record.put()
        return record

    return ndb.transaction(take)


def release(payload_id: str, token: str, *, task_name: str) -> None:
    """Give up a claim this delivery holds (it did not finish the task), so a retry runs now."""

    def give_up() -> None:
        record = payload_key(payload_id).get()
        if record is not None and record.claim == f"{task_name} {token}":
            record.claim = record.claimed_until = None
            record.put()

    ndb.transaction(give_up)


def finish(payload_id: str, chunks: int) -> None:
    """After success: delete record and chunks and leave a done marker, in one Commit."""
    marker = DeferredPayloadDone(key=done_key(payload_id), done=now())
    _ndb_rpc.commit(
        upserts=[marker], deletes=[payload_key(payload_id), *chunk_keys(payload_id, chunks)]
    )


def delete(payload_id: str, chunks: int) -> None:
    """Delete a record and its chunks in one commit."""
    ndb.delete_multi(
        [payload_key(payload_id), *chunk_keys(payload_id, chunks)],
        timeout=settings().datastore_timeout_seconds,
    )


def get(payload_id: str) -> DeferredPayload | None:
    """The record alone (no payload bytes), or None."""
    return payload_key(payload_id).get()
