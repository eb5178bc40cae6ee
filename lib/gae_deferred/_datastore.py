"""The ndb client gae_deferred uses, and a context to run code in.

ndb talks to ``DATASTORE_EMULATOR_HOST`` when that is set (the local stack), to Datastore otherwise.
Tests hand in a stub client with ``configure(ndb_client=...)``.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from google.cloud import ndb

from . import _ndb_rpc
from ._config import settings

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
