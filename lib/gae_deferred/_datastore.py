"""The ndb client gae_deferred uses, and a context to run code in.

ndb talks to ``DATASTORE_EMULATOR_HOST`` when that is set (the local stack), to Datastore otherwise.
Tests hand in a stub client with ``configure(ndb_client=...)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from google.cloud import ndb

from . import _ndb_rpc
from ._config import settings

logger = logging.getLogger("gae_deferred")

#: How long giving up a claim retries while Datastore is unavailable (see patiently).
CLAIM_RELEASE_SECONDS = 30.0

_lock = threading.Lock()
_thread_contexts = threading.local()


@functools.cache
def _default_client(project: str | None) -> ndb.Client:
    return ndb.Client(project=project)


def reset_client() -> None:
    """Forget the cached client, so the next one reads DATASTORE_EMULATOR_HOST again."""
    _default_client.cache_clear()


def client() -> ndb.Client:
    """The configured ndb client, created once per process."""
    current = settings()
    if current.ndb_client is not None:
        return current.ndb_client
    with _lock:
        return _default_client(current.project)


class ndb_context:
    """Use the caller's ndb context if there is one, else one of ours.

    Ours is made once per thread and reused with its cache cleared: building an ndb context
    (event loop, queues, locks) is the largest fixed cost of a task, and a task handler
    thread runs one task at a time. After an exception the context is dropped, in case work
    was left on its event loop. gae_deferred's own models opt out of ndb's caches. A class,
    not ``@contextmanager``: it is on every task's path.
    """

    __slots__ = ("_context",)

    def __enter__(self) -> ndb.Context:
        existing = ndb.get_context(raise_context_error=False)
        if existing is not None:
            self._context = None
            return existing
        current_client = client()
        context = getattr(_thread_contexts, "context", None)
        if context is None or context.client is not current_client:
            context = ndb.context.Context(current_client)
            _thread_contexts.context = context
        context.clear_cache()
        self._context = context
        _ndb_rpc.enter_context(context)
        return context

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        context = self._context
        if context is None:
            return
        clean = exc_type is None
        try:
            if clean:
                context.eventloop.run()
        except BaseException:
            clean = False
            raise
        finally:
            if not clean:
                _thread_contexts.context = None
            _ndb_rpc.exit_context()


#: Where legacy ``namespace_manager`` kept the namespace of a request (set_namespace() wrote
#: it; App Engine set the default one from the request).
NAMESPACE_ENVIRON = ("HTTP_X_APPENGINE_CURRENT_NAMESPACE", "HTTP_X_APPENGINE_DEFAULT_NAMESPACE")
# Read on every defer(), where they are almost never set: os.environ.get of a missing key
# encodes it and raises KeyError inside, several microseconds (defer()'s build budget is a few
# dozen). CPython's os.environ keeps its data in ``_data`` under encoded keys: one dict lookup.
_ENVIRON_DATA: dict | None = getattr(os.environ, "_data", None)
_ENVIRON_KEYS = tuple(os.environ.encodekey(name) for name in NAMESPACE_ENVIRON)  # type: ignore[attr-defined]


def current_namespace() -> str:
    """The Datastore namespace the caller works in, which a task deferred now runs in.

    The current ndb context's namespace where one is set on the context; else the legacy
    ``namespace_manager`` environment value where one is set; else the ndb client's namespace;
    ``""`` is the default namespace.
    """
    context = _ndb_rpc.current_context()
    if context is not None and context.namespace is not ndb.key.UNDEFINED:
        return context.namespace or ""
    value = _environ_namespace()
    if value is not None:
        return value
    if context is not None:
        return context.client.namespace or ""
    return ""


def _environ_namespace() -> str | None:
    if _ENVIRON_DATA is None:
        return next((os.environ[name] for name in NAMESPACE_ENVIRON if name in os.environ), None)
    for key in _ENVIRON_KEYS:
        raw = _ENVIRON_DATA.get(key)
        if raw is not None:
            return os.environ.decodevalue(raw)  # type: ignore[attr-defined]
    return None


@contextlib.contextmanager
def in_namespace(namespace: str) -> Iterator[None]:
    """Run the block in the current ndb context with ``namespace`` as its namespace (the same
    cache, batches and transaction: only the namespace differs)."""
    context = ndb.get_context()
    if (context.get_namespace() or "") == namespace:
        yield
        return
    with context.new(namespace=namespace).use():
        yield


def patiently(call: Callable[[], None], what: str, seconds: float | None = None) -> bool:
    """Call ``call``, retrying any error with backoff for up to ``seconds``
    (CLAIM_RELEASE_SECONDS): a Datastore restart takes seconds. False, logged, if it never
    succeeded. For giving up a claim after a failed attempt: left in place, the claim would
    hold every redelivery off until its lease ends."""
    deadline = time.monotonic() + (CLAIM_RELEASE_SECONDS if seconds is None else seconds)
    delay = 0.5
    while True:
        try:
            call()
            return True
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                logger.warning("could not %s (%s); it holds until its lease ends", what, exc)
                return False
        time.sleep(delay)
        delay = min(delay * 2, 4.0)
