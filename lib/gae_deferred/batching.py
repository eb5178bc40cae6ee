"""batch(): defer many calls at once, in BatchCreateTasks calls per queue and shared commits.

::

    from gae_deferred import BatchDeferError, batch

    with batch(concurrency=32) as digest:
        for user_id in user_ids:
            digest.defer(send_digest, user_id, _queue="mail")
    digest.tasks          # a DeferredTask for each call, in call order

``batch.defer()`` takes exactly what :func:`gae_deferred.defer` takes and checks it the same way
at once (a bad option raises there). Nothing is sent until the block ends; then payloads that
spill to Datastore are written together (commits of up to 500 entities and ``commit_bytes``),
and the tasks are created in ``BatchCreateTasks`` calls of up to 100 tasks of one queue,
``concurrency`` calls at a time (where Cloud Tasks refuses that RPC, one CreateTask per task:
see docs/batch.md). It is all ``enqueue.send``, the path defer() takes for one call. An
exception inside the block enqueues nothing.

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
together, and their tasks are created the same way once it commits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .enqueue import DeferredTask, PreparedCall, check_sendable, prepare_defer, send
from .errors import BatchDeferError, DeferError

#: BatchCreateTasks (or CreateTask) requests in flight at once unless batch() says otherwise.
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

    def defer(self, obj: Callable, *args: Any, **kwargs: Any) -> int:
        """Add ``obj(*args, **kwargs)`` to the batch, with defer()'s options; returns its index.

        The call is checked and serialized now (its arguments are captured as they are now);
        it is sent when the block ends.
        """
        if self._state != "open":
            raise DeferError("batch.defer() is only allowed inside its `with batch()` block")
        call = prepare_defer(obj, *args, **kwargs)
        check_sendable(call)
        self._calls.append(call)
        return len(self._calls) - 1

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        calls, self._calls = self._calls, []
        self._state = "closed"
        if exc_type is None:
            self._send(calls)

    def _send(self, calls: list[PreparedCall]) -> None:
        outcomes = send(calls, self.concurrency)
        self.tasks = [task if isinstance(task, DeferredTask) else None for task in outcomes]
        failures = [(i, error) for i, error in enumerate(outcomes) if isinstance(error, Exception)]
        if failures:
            raise BatchDeferError(failures, self.tasks)


def batch(concurrency: int = DEFAULT_CONCURRENCY) -> Batch:
    """A batch of deferred calls: ``with batch(concurrency=32) as b: b.defer(fn, *args)``.

    ``concurrency`` bounds the Cloud Tasks requests in flight at once. See the module docstring.
    """
    return Batch(concurrency)


__all__ = ["Batch", "BatchDeferError", "batch"]
