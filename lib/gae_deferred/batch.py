"""batch(): defer many calls at once, CreateTask calls in parallel and spills in shared commits.

::

    from gae_deferred import BatchDeferError, batch

    with batch(concurrency=32) as digest:
        for user_id in user_ids:
            digest.defer(send_digest, user_id, _queue="mail")
    digest.tasks          # a DeferredTask for each call, in call order

``batch.defer()`` takes exactly what :func:`gae_deferred.defer` takes and checks it the same way
at once (a bad option raises there). Nothing is sent until the block ends; then the calls'
CreateTask requests run ``concurrency`` at a time, and payloads that spill to Datastore are
written together (commits of up to 500 entities and ``commit_bytes``) before any task is
created. An exception inside the block enqueues nothing.

When some calls fail, the others stay enqueued and :class:`BatchDeferError` lists each failed
call by index (a duplicate ``_name``, a missing queue, ...); ``tasks`` has None at those
indexes. A spilled call whose CreateTask failed has its payload deleted, or, if that fails too,
its exception is EnqueueOutcomeUnknown (the sweeper creates the task: do not defer it again)::

    try:
        with batch() as b:
            for order in orders:
                b.defer(ship, order.id, _name=f"ship-{order.id}")
    except BatchDeferError as exc:
        for index, error in exc.failures:
            logging.warning("order %s: %s", orders[index].id, error)

``_transactional=True`` calls inside a transaction are written in the caller's commit, all
together, and their tasks are created (``concurrency`` at a time) once it commits.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any

from google.cloud import ndb

from . import spillover
from ._datastore import ndb_context
from .enqueue import (
    DeferredTask,
    PreparedCall,
    _routing,
    defer_transactional,
    fits_inline,
    map_concurrently,
    prepare_call,
    reference,
    send_inline,
    send_spilled,
    spill_entities,
    write_outside_transaction,
)
from .errors import BadTransactionStateError, BatchDeferError, DeferError

#: CreateTask requests in flight at once unless batch() says otherwise.
DEFAULT_CONCURRENCY = 32


class Batch:
    """Calls collected by ``with batch() as b: b.defer(...)``, sent when the block ends."""

    def __init__(self, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise DeferError(f"concurrency must be an int >= 1, not {concurrency!r}")
        self.concurrency = concurrency
        #: After the block: one DeferredTask per call in call order (None where a call failed).
        self.tasks: list[DeferredTask | None] = []
        self._calls: list[PreparedCall] = []
        self._state = "new"

    def __enter__(self) -> Batch:
        if self._state != "new":
            raise DeferError("a batch is used for one `with` block only")
        self._state = "open"
        return self

    def defer(
        self,
        obj: Callable,
        *args: Any,
        _countdown: float | None = None,
        _eta: datetime.datetime | None = None,
        _name: str | None = None,
        _queue: str | None = None,
        _url: str | None = None,
        _headers: Mapping[str, str] | None = None,
        _target: str | None = None,
        _service: str | None = None,
        _version: str | None = None,
        _instance: str | None = None,
        _retry_options: Any = None,
        _transactional: bool = False,
        **kwargs: Any,
    ) -> int:
        """Add ``obj(*args, **kwargs)`` to the batch, with defer()'s options; returns its index.

        The call is checked and serialized now (its arguments are captured as they are now);
        it is sent when the block ends.
        """
        if self._state != "open":
            raise DeferError("batch.defer() is only allowed inside its `with batch()` block")
        call = prepare_call(
            obj,
            args,
            kwargs,
            countdown=_countdown,
            eta=_eta,
            name=_name,
            queue=_queue,
            url=_url,
            headers=_headers,
            routing=_routing(_target, _service, _version, _instance),
            retry_options=_retry_options,
            transactional=_transactional,
        )
        if call.transactional or not fits_inline(call):
            spillover.check_size(call.data, call.header)
        if call.transactional:
            context = ndb.get_context(raise_context_error=False)
            if context is None or not context.in_transaction():
                raise BadTransactionStateError(
                    "_transactional=True needs an active ndb transaction"
                )
        self._calls.append(call)
        return len(self._calls) - 1

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        calls, self._calls = self._calls, []
        self._state = "closed"
        if exc_type is None:
            self._send(calls)

    def _send(self, calls: list[PreparedCall]) -> None:
        tasks: list[DeferredTask | None] = [None] * len(calls)
        failures: dict[int, BaseException] = {}
        transactional = [i for i, call in enumerate(calls) if call.transactional]
        rest = [i for i, call in enumerate(calls) if not call.transactional]
        if transactional:
            try:
                created = defer_transactional([calls[i] for i in transactional], self.concurrency)
            except DeferError as exc:
                failures.update(dict.fromkeys(transactional, exc))
            else:
                for index, task in zip(transactional, created, strict=True):
                    tasks[index] = task
        work: list[tuple[int, Callable[[], DeferredTask]]] = [
            (i, lambda call=calls[i]: send_inline(call)) for i in rest if fits_inline(calls[i])
        ]
        spilled = [i for i in rest if not fits_inline(calls[i])]
        if spilled:
            work += self._write_spilled(calls, spilled, failures)
        outcomes = map_concurrently(lambda item: item[1](), work, self.concurrency)
        for (index, _), (task, error) in zip(work, outcomes, strict=True):
            if error is None:
                tasks[index] = task
            else:
                failures[index] = error
        self.tasks = tasks
        if failures:
            raise BatchDeferError(sorted(failures.items()), tasks)

    @staticmethod
    def _write_spilled(
        calls: list[PreparedCall], indexes: list[int], failures: dict[int, BaseException]
    ) -> list[tuple[int, Callable[[], DeferredTask]]]:
        """Write every spilled payload of the batch in shared commits, outside any transaction;
        returns the CreateTask work for them (none if the write failed: then each fails)."""
        with ndb_context():
            entities = [spill_entities(calls[i]) for i in indexes]
            bodies = [reference(record) for record, _ in entities]
            try:
                write_outside_transaction(entities)
            except DeferError as exc:
                failures.update(dict.fromkeys(indexes, exc))
                return []
        return [
            (i, lambda r=record, s=calls[i].spec, b=body: send_spilled(r, s, b))
            for i, (record, _), body in zip(indexes, entities, bodies, strict=True)
        ]


def batch(concurrency: int = DEFAULT_CONCURRENCY) -> Batch:
    """A batch of deferred calls: ``with batch(concurrency=32) as b: b.defer(fn, *args)``.

    ``concurrency`` bounds the CreateTask requests in flight at once. See the module docstring.
    """
    return Batch(concurrency)


__all__ = ["Batch", "BatchDeferError", "batch"]
