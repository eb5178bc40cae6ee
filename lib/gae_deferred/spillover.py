"""Payloads too big for a task live in Datastore until the task has run.

A spilled payload is one ``_DeferredPayload`` record — only the fields the dashboard lists and
sorts by — plus ``_DeferredPayloadChunk`` children holding the envelope bytes::

    record = store(envelope_bytes, header, queue="reports", task_name="d-1f2e...", eta=eta)
    data = load(record.key.id(), record.chunks)   # one Lookup, however many chunks
    delete(record.key.id(), record.chunks)        # one Commit

Records of tasks that failed for good stay (state ``permanent`` or ``dead``, the words of the
failure registry) so they can be retriggered; records still ``pending`` long after their ETA are
re-enqueued by the sweeper.
"""

from __future__ import annotations

import datetime
import enum
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from google.cloud import ndb

from . import _facets
from ._config import settings
from ._model import MAX_INDEXED_CHARS, DeferredModel
from .errors import PayloadTooLargeError, SpilledPayloadMissing

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
    #: Search tokens (state, queue, function prefixes): the dashboard's filters (see _facets).
    facets = ndb.ComputedProperty(
        lambda record: _facets.facets(
            state=record.state, queue=record.queue, function=record.function
        ),
        repeated=True,
    )
    #: -created in ms, for "newest first within a time range" (see admin.SpillFilter).
    created_desc = ndb.ComputedProperty(lambda record: _facets.descending_ms(record.created))

    @property
    def id(self) -> str:
        return self.key.id()


class DeferredPayloadChunk(DeferredModel):
    """Up to chunk_bytes of a spilled envelope; chunk n has integer id n (1-based)."""

    data = ndb.BlobProperty(indexed=False)


def new_payload_id() -> str:
    """A client-made id, so the task name and chunk keys are known before any RPC."""
    return uuid.uuid4().hex


def payload_key(payload_id: str) -> ndb.Key:
    return ndb.Key(DeferredPayload, payload_id)


def chunk_keys(payload_id: str, chunks: int) -> list[ndb.Key]:
    parent = payload_key(payload_id)
    return [ndb.Key(DeferredPayloadChunk, number, parent=parent) for number in range(1, chunks + 1)]


def _split(data: bytes, size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def build_record(
    payload_id: str,
    envelope: bytes,
    header: dict[str, Any],
    *,
    queue: str,
    task_name: str,
    eta: datetime.datetime,
    task: dict[str, Any],
    transactional: bool = False,
) -> tuple[DeferredPayload, list[DeferredPayloadChunk]]:
    """The record and chunk entities for a payload, not yet written."""
    current = settings()
    if len(envelope) > current.max_payload_bytes:
        raise PayloadTooLargeError(
            f"payload of {header.get('function')} is {len(envelope):,} bytes, over the "
            f"{current.max_payload_bytes:,} byte cap (max_payload_bytes)"
        )
    chunks = [
        DeferredPayloadChunk(key=key, data=piece)
        for key, piece in zip(
            chunk_keys(payload_id, -(-len(envelope) // current.chunk_bytes)),
            _split(envelope, current.chunk_bytes),
            strict=True,
        )
    ]
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
        payload_bytes=int(header.get("raw_bytes", len(envelope))),
        stored_bytes=len(envelope),
        chunks=len(chunks),
        transactional=transactional,
        meta=header,
        task=task,
    )
    return record, chunks


def write(record: DeferredPayload, chunks: list[DeferredPayloadChunk]) -> None:
    """Write chunks and record: one commit unless the payload exceeds Datastore's commit size.

    Datastore refuses commits over 10 MiB, so a larger payload goes out in several commits of
    chunks first and the record last: a record never points at chunks that were not written.
    """
    batch: list[ndb.Model] = []
    batch_bytes = 0
    written: list[ndb.Key] = []
    limit = settings().commit_bytes
    try:
        for chunk in chunks:
            if batch and batch_bytes + len(chunk.data) > limit:
                written += ndb.put_multi(batch)
                batch, batch_bytes = [], 0
            batch.append(chunk)
            batch_bytes += len(chunk.data)
        ndb.put_multi([*batch, record])
    except Exception:
        if written:
            _delete_orphans(written)
        raise


def _delete_orphans(keys: list[ndb.Key]) -> None:
    """Chunks of a spill whose record was never written: nothing else would ever find them."""
    try:
        ndb.delete_multi(keys)
    except Exception:  # the original error matters more; these chunks are only wasted space
        logger.exception("could not delete %d orphaned payload chunks", len(keys))


def load(payload_id: str, chunks: int) -> tuple[DeferredPayload, bytearray]:
    """The record and the envelope bytes, read in one batched Lookup.

    The bytes come back as one preallocated ``bytearray`` that every chunk is copied into and
    then dropped, so a 32 MiB payload is held once here instead of as chunks plus their join::

        record, data = load(payload_id, record.chunks)
        envelope.open_envelope(data)   # verifies in place; the body is a view into ``data``
    """
    entities: list[Any] = ndb.get_multi([payload_key(payload_id), *chunk_keys(payload_id, chunks)])
    record = entities[0]
    if record is None:
        raise SpilledPayloadMissing(f"spilled payload {payload_id} is gone from Datastore")
    missing = [number for number in range(1, len(entities)) if entities[number] is None]
    if missing:
        raise SpilledPayloadMissing(f"spilled payload {payload_id} lacks chunk(s) {missing}")
    data = bytearray(sum(len(piece.data or b"") for piece in entities[1:]))
    offset = 0
    with memoryview(data) as view:
        for number in range(1, len(entities)):
            piece = entities[number].data or b""
            entities[number] = None  # this chunk's only reference: its bytes go now
            view[offset : offset + len(piece)] = piece
            offset += len(piece)
    return record, data


def delete(payload_id: str, chunks: int) -> None:
    """Delete a record and its chunks in one commit."""
    ndb.delete_multi([payload_key(payload_id), *chunk_keys(payload_id, chunks)])


def get(payload_id: str) -> DeferredPayload | None:
    """The record alone (no payload bytes), or None."""
    return payload_key(payload_id).get()
