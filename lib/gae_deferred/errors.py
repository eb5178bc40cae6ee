"""Exceptions raised by gae_deferred.

The first two keep the meaning they had in ``google.appengine.ext.deferred``::

    from gae_deferred import PermanentTaskFailure, SingularTaskFailure

    def charge(order_id):
        order = Order.get_by_id(order_id)
        if order is None:
            raise PermanentTaskFailure("order %s is gone" % order_id)  # never retried
        if gateway_busy():
            raise SingularTaskFailure()  # retried, without an error in the logs

The ``DeferError`` family is raised by :func:`gae_deferred.defer` on the write path, each naming
its cause; the task path records the ``PermanentTaskFailure`` subclasses; the dashboard answers
an ``AdminError`` with its ``status``.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every exception gae_deferred raises itself."""


class PermanentTaskFailure(Error):
    """The task failed and must not be retried; the failure is recorded."""


class SingularTaskFailure(Error):
    """The task should be retried without logging an error."""


class DeferError(Error):
    """defer() could not create the task; nothing was enqueued unless the message says so."""


class ConfigurationError(DeferError):
    """Settings are missing or invalid (signing key, project, location, limits)."""


class SerializationError(DeferError):
    """The callable or one of its arguments cannot be pickled; names the offending value."""


class PayloadTooLargeError(DeferError):
    """The serialized payload is bigger than the configured hard cap."""


class DuplicateDeliveryRunning(SingularTaskFailure):
    """Another delivery of this task (or another call with this ``@idempotent`` key) holds the
    claim and is running now: this one does not run. The handler answers 503, so Cloud Tasks
    retries it later, when the first has finished (then it is a no-op) or failed (then it runs).
    """


class InvalidTaskError(DeferError):
    """An option of the task is invalid: countdown, eta, url, headers, target (legacy
    ``taskqueue.InvalidTaskError``, the base of the two below as it was there)."""


class InvalidTaskNameError(InvalidTaskError):
    """``_name`` is not a valid task name (legacy ``taskqueue.InvalidTaskNameError``)."""


class TaskAlreadyExistsError(InvalidTaskError):
    """A task with this name exists, or existed recently (legacy ``TaskAlreadyExistsError``)."""


class TombstonedTaskError(TaskAlreadyExistsError):
    """A task of this name ran or was deleted recently, and the name is not free again yet
    (legacy ``taskqueue.TombstonedTaskError``; a ``TaskAlreadyExistsError`` too, so one
    ``except`` clause of either name catches it)."""


class UnknownQueueError(DeferError):
    """The queue does not exist (legacy ``taskqueue.UnknownQueueError``)."""


class QueueNotFoundError(UnknownQueueError):
    """The queue does not exist in Cloud Tasks (run ``python -m gae_deferred.queues sync``)."""


class BadTransactionStateError(DeferError):
    """``_transactional=True`` outside an ndb transaction (legacy
    ``taskqueue.BadTransactionStateError``)."""


class InvalidTaskRetryOptionsError(DeferError):
    """``_retry_options`` or a TaskRetryOptions is invalid (legacy
    ``taskqueue.InvalidTaskRetryOptionsError``)."""


class EnqueueError(DeferError):
    """Cloud Tasks refused or could not be reached while creating the task."""


class EnqueueOutcomeUnknown(EnqueueError):
    """defer() cannot know whether the task will run: do not defer the call again.

    Raised when Cloud Tasks did not answer in time (the task may or may not exist), when a
    Datastore commit holding a spilled or transactional payload failed after it may have been
    applied and reading it back failed too, or when a payload that may exist could not be
    deleted. Whatever was stored is run once: the sweeper creates the task of a pending record
    under the same name if it is missing. What the caller can do: look the task up by
    ``queue`` and ``task_name`` (``gae_deferred.cloud_tasks.get_task``) or the record by
    ``payload_id`` (``gae_deferred.spillover.get``), or make the work idempotent by its own key
    (``@idempotent(key=...)``) and defer again. ``task_name`` is None only where no name is
    known (a batch reports per call).
    """

    def __init__(
        self,
        message: str,
        *,
        task_name: str | None = None,
        queue: str | None = None,
        payload_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.task_name = task_name
        self.queue = queue
        self.payload_id = payload_id


class BatchDeferError(DeferError):
    """Some calls of a :func:`gae_deferred.batch` were not enqueued; the others were.

    ``failures`` lists ``(index, exception)`` per failed call, in call order (the index is the
    call's position in the batch); ``tasks`` is the batch's list of DeferredTask, with None at
    each failed index. An exception that is EnqueueOutcomeUnknown means that call's task may
    still be created (by the sweeper): do not defer it again.
    """

    def __init__(self, failures: list[tuple[int, BaseException]], tasks: list) -> None:
        self.failures = failures
        self.tasks = tasks
        listed = "; ".join(
            f"call {index}: {type(exc).__name__}: {exc}" for index, exc in failures[:10]
        )
        more = f"; and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(
            f"{len(failures)} of {len(tasks)} deferred calls were not enqueued (the others "
            f"were): {listed}{more}"
        )


class DatastoreUnavailableError(DeferError):
    """A spilled payload was certainly not written to Datastore: it did not answer, or kept
    failing with a transient error (UNAVAILABLE, ABORTED, ...) through the retries, and
    nothing will run it. A write that may have landed is never reported this way (see
    EnqueueOutcomeUnknown).
    """


class DatastoreRefusedError(DeferError):
    """Datastore refused to store a spilled payload (INVALID_ARGUMENT, a request over its size
    limit, PERMISSION_DENIED, ...): not retried, since it would refuse the same request again.
    The message carries Datastore's own; ``__cause__`` is the Google API error."""


class UnverifiedEnvelope(PermanentTaskFailure):
    """The body is not an intact envelope signed with a known key: nothing was executed."""


class PayloadLoadError(PermanentTaskFailure):
    """A verified payload does not load in this runtime: version skew, renamed code."""


class VersionSkewError(PayloadLoadError):
    """A verified payload does not load here and was written by another Python, cloudpickle
    or app version (named, with this runtime's, in the message): it is kept as a dead letter,
    and the dashboard can retry it on the version that made it."""


class SpilledPayloadMissing(PermanentTaskFailure):
    """The task references a spilled payload that is no longer in Datastore.

    ``already_ran`` is True when the payload's done marker is there: the task succeeded before
    and this is a duplicate delivery; ``record_found`` when the record is there but chunks are
    not (never a commit in flight: they are written before it).
    """

    def __init__(
        self, message: str, *, already_ran: bool = False, record_found: bool = False
    ) -> None:
        super().__init__(message)
        self.already_ran = already_ran
        self.record_found = record_found


class TaskFailed(Error):
    """The deferred function raised: its failure is recorded and Cloud Tasks retries the task.

    Legacy handlers let the task's exception escape ``run_from_request()``; the legacy
    ``Handler`` and ``TaskHandler`` raise this in its place, after the failure was recorded.
    ``result`` is what the handler answers (``retrying``, or ``dead`` on the last attempt).
    """

    def __init__(self, message: str, result: str = "retrying") -> None:
        super().__init__(message)
        self.result = result


class AdminError(Error):
    """A request the dashboard refuses; ``status`` is the HTTP status to answer with."""

    status = 400


class BadRequest(AdminError):
    status = 400


class NotFound(AdminError):
    status = 404


class Conflict(AdminError):
    status = 409


class CountChanged(Conflict):
    """A bulk action confirmed for ``expected`` records now matches ``count``: nothing was
    done; ask again with the new count."""

    def __init__(self, expected: int, count: int) -> None:
        super().__init__(
            f"{count} records match now, not the {expected} confirmed: nothing was done"
        )
        self.expected = expected
        self.count = count


class Unavailable(AdminError):
    """Cloud Tasks or Datastore could not be reached; the page says so instead of a 500."""

    status = 503
