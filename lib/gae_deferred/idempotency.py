"""At-least-once made safe: skip a repeat run of the same task.

Cloud Tasks may deliver a task twice (a lost response, a retry after the work was done). Wrap
work that must happen once::

    from gae_deferred import idempotent

    @idempotent
    def charge(order_id):
        ...   # runs once per task, however often the task is delivered

    defer(charge, order_id)

The key is the task's queue and name (``key=`` overrides it, e.g. the order id, kept apart per
Datastore namespace of the context the function runs in). The
completion marker is written in the same transaction as the function's own Datastore writes
when ``transactional=True`` — then "done" and the work commit together; otherwise it is written
after the function returns, so a crash in between may still repeat it once.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from google.cloud import ndb

from ._datastore import ndb_context
from ._model import DeferredModel, root_key
from .context import current_task

F = TypeVar("F", bound=Callable[..., Any])


class DeferredDone(DeferredModel):
    """Marks one idempotency key as done."""

    done = ndb.DateTimeProperty(tzinfo=datetime.UTC, indexed=False)
    function = ndb.TextProperty()


def _marker_key(func: Callable, key: str | None) -> ndb.Key | None:
    if key is None:
        task = current_task()
        if task is None:
            return None
        key = f"{task.queue}/{task.name}"
    marker = f"{func.__module__}.{func.__qualname__}:{key}"
    # Markers live in gae_deferred's namespace; a key of the caller's is per tenant.
    namespace = ndb.get_context().get_namespace()
    return root_key(DeferredDone, f"{namespace}/{marker}" if namespace else marker)


def idempotent(
    func: F | None = None, *, key: Callable[..., str] | None = None, transactional: bool = False
) -> Any:
    """Decorator: run ``func`` at most once per task (or per ``key(*args, **kwargs)``).

    Outside a task and without ``key`` the function simply runs.
    """

    def decorate(inner: F) -> F:
        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with ndb_context():
                marker = _marker_key(inner, key(*args, **kwargs) if key else None)
                if marker is None:
                    return inner(*args, **kwargs)
                if transactional:
                    return ndb.transaction(lambda: _once(marker, inner, args, kwargs))
                return _once(marker, inner, args, kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate


def _once(marker: ndb.Key, func: Callable, args: tuple, kwargs: dict) -> Any:
    if marker.get() is not None:
        return None
    result = func(*args, **kwargs)
    DeferredDone(
        key=marker,
        done=datetime.datetime.now(datetime.UTC),
        function=f"{func.__module__}.{func.__qualname__}",
    ).put()
    return result
