"""At-least-once made safe: skip a repeat run of the same task.

Cloud Tasks may deliver a task twice (a lost response, a retry after the work was done). Wrap
work that must happen once::

    from gae_deferred import idempotent

    @idempotent
    def charge(order_id):
        ...   # runs once per task, however often the task is delivered

    defer(charge, order_id)

The key is the task's queue and name (``key=`` overrides it, e.g. the order id, kept apart per
Datastore namespace of the context the function runs in). The marker's
Datastore key name is the function's dotted name, ``:`` and the key; where that would be over
Datastore's 1,500-byte limit on key names (or of its reserved form ``__x__``), the key is
replaced by ``sha256:`` and its SHA-256 in hex, so keys of any length work (two keys collide
only if their SHA-256 does).

A claim on the key is taken in a transaction before the call, so a duplicate delivery while
the first runs does not run (DuplicateDeliveryRunning: the handler answers 503, Cloud Tasks
retries it later and it finds the key done). The completion marker is written in the same
transaction as the function's own Datastore writes when ``transactional=True`` — then "done"
and the work commit together; otherwise it is written after the function returns, so a crash
in between may still repeat it once (after the claim ran out).

The caller's own transaction, exactly once by the caller's key (a rerun after an error, or
the same order paid twice, finds the key done)::

    @idempotent(key=lambda order_id: f"pay:{order_id}", transactional=True)
    def pay(order_id):
        Order(id=order_id, paid=True).put()
        defer(send_receipt, order_id, _transactional=True)
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from google.cloud import ndb

from ._config import settings
from ._datastore import ndb_context, patiently
from ._model import DeferredModel, is_key_name, root_key
from .context import current_task
from .errors import DuplicateDeliveryRunning

F = TypeVar("F", bound=Callable[..., Any])


class DeferredDone(DeferredModel):
    """Marks one idempotency key as done (``done`` set), or claimed by a call running now
    (``claim`` and ``claimed_until`` set, ``done`` not)."""

    done = ndb.DateTimeProperty(tzinfo=datetime.UTC, indexed=False)
    function = ndb.TextProperty()
    claim = ndb.TextProperty()
    claimed_until = ndb.DateTimeProperty(tzinfo=datetime.UTC, indexed=False)


def _marker_key(func: Callable, key: str | None) -> ndb.Key | None:
    if key is None:
        task = current_task()
        if task is None:
            return None
        key = f"{task.queue}/{task.name}"
    function = _name(func)
    # Markers live in gae_deferred's namespace; a key of the caller's is per tenant.
    namespace = ndb.get_context().get_namespace()
    key = f"{namespace}/{key}" if namespace else key
    name = f"{function}:{key}"
    if not is_key_name(name):
        digest = hashlib.sha256(str(key).encode("utf-8", "surrogatepass")).hexdigest()
        name = f"{function[:_FUNCTION_CHARS]}:sha256:{digest}"
    return root_key(DeferredDone, name)


#: Enough of a function's name for a hashed key's marker to stay under 1,500 bytes.
_FUNCTION_CHARS = 300


def _name(func: Callable) -> str:
    return f"{func.__module__}.{func.__qualname__}"


def idempotent(
    func: F | None = None, *, key: Callable[..., str] | None = None, transactional: bool = False
) -> Any:
    """Decorator: run ``func`` at most once per task (or per ``key(*args, **kwargs)``).

    Before the call a claim on the key is taken in a transaction (until now +
    ``task_deadline_seconds``): a second call with the key while the first runs raises
    DuplicateDeliveryRunning (a task answers 503 and is retried later), one after it finished
    returns None without calling. A call that raises gives its claim up. Outside a task and
    without ``key`` the function simply runs.
    """

    def decorate(inner: F) -> F:
        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with ndb_context():
                marker = _marker_key(inner, key(*args, **kwargs) if key else None)
                if marker is None:
                    return inner(*args, **kwargs)
                token = uuid.uuid4().hex
                give_up = ndb.non_transactional()(functools.partial(_release, marker, token))
                try:
                    claimed = ndb.non_transactional()(_claim)(marker, token, _name(inner))
                except DuplicateDeliveryRunning:
                    raise
                except Exception:
                    # Its commit may have landed unanswered: give up what it may hold.
                    patiently(give_up, f"give up the claim on {marker.id()}")
                    raise
                if not claimed:
                    return None
                try:
                    if transactional:
                        return ndb.transaction(lambda: _once(marker, inner, args, kwargs))
                    # The claim's transaction just found the key not done: call, then mark.
                    result = inner(*args, **kwargs)
                    _done(marker, inner)
                    return result
                except BaseException:
                    patiently(give_up, f"give up the claim on {marker.id()}")
                    raise

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate


def _claim(marker: ndb.Key, token: str, function: str) -> bool:
    """In a transaction: False if the key is done; else claim it for this call (raising
    DuplicateDeliveryRunning while another call's claim is on)."""

    def take() -> bool:
        current = marker.get()
        now = datetime.datetime.now(datetime.UTC)
        if current is not None and current.done is not None:
            return False
        if (
            current is not None
            and current.claim not in (None, token)
            and (current.claimed_until or now) > now
        ):
            raise DuplicateDeliveryRunning(
                f"{function} is running for {marker.id()} (claimed until "
                f"{current.claimed_until:%H:%M:%S} UTC)"
            )
        seconds = settings().task_deadline_seconds
        DeferredDone(
            key=marker,
            function=function,
            claim=token,
            claimed_until=now + datetime.timedelta(seconds=seconds),
        ).put()
        return True

    return ndb.transaction(take)


def _release(marker: ndb.Key, token: str) -> None:
    """The call raised: drop its claim so a retry runs at once."""

    def give_up() -> None:
        current = marker.get()
        if current is not None and current.done is None and current.claim == token:
            marker.delete()

    ndb.transaction(give_up)


def _once(marker: ndb.Key, func: Callable, args: tuple, kwargs: dict) -> Any:
    """In the work's transaction: call unless done (read again, inside it), and mark the key
    done in the same transaction as the function's writes."""
    current = marker.get()
    if current is not None and current.done is not None:
        return None
    result = func(*args, **kwargs)
    _done(marker, func)
    return result


def _done(marker: ndb.Key, func: Callable) -> None:
    DeferredDone(key=marker, done=datetime.datetime.now(datetime.UTC), function=_name(func)).put()
