"""Whether a failed write may still have been applied: the one place that decides.

Datastore commits and Cloud Tasks' CreateTask alike: a call that fails with a definite
refusal (invalid argument, permission denied, contention, a connection that was never made)
was not applied. One that failed after its request was sent (the reply was lost with its
connection, the deadline passed, an internal error) may have been: the write can have landed
all the same. defer() asks here before it says "not stored", and when the answer is "maybe"
it reads the written key to find out::

    try:
        write()
    except GoogleAPIError as exc:
        if not may_have_landed(exc):
            raise DatastoreUnavailableError(...)      # certain: nothing was stored
        ...look the record up: there -> stored; else EnqueueOutcomeUnknown
"""

from __future__ import annotations

from google.api_core import exceptions as api_exceptions

#: Errors raised after a request may have reached Datastore and been applied.
_AMBIGUOUS = (
    api_exceptions.DeadlineExceeded,
    api_exceptions.ServiceUnavailable,
    api_exceptions.InternalServerError,
    api_exceptions.Unknown,
    api_exceptions.Cancelled,
    api_exceptions.RetryError,
)
#: How gRPC says a request never left: no connection could be made for it.
_NOT_SENT = ("failed to connect", "connection refused", "dns resolution failed")


def settled_as_not_stored(exc: BaseException) -> BaseException:
    """Mark ``exc`` as settled: whatever it left behind can never run (e.g. a spill's chunks
    whose commit may have landed, while their record's commit was never sent)."""
    exc._gae_deferred_settled = True  # type: ignore[attr-defined]
    return exc


def may_have_landed(exc: BaseException) -> bool:
    """True when the call that raised ``exc`` may have been applied (its outcome is unknown);
    False for a refusal, a connection that was never made, or an error settled as not stored
    (certainly nothing that runs)."""
    if getattr(exc, "_gae_deferred_settled", False):
        return False
    if isinstance(exc, api_exceptions.RetryError):
        cause = exc.cause
        return cause is None or may_have_landed(cause)
    if not isinstance(exc, _AMBIGUOUS):
        return False
    text = str(exc).lower()
    return not any(marker in text for marker in _NOT_SENT)
