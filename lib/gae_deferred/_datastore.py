"""The ndb client gae_deferred uses, and a context to run code in.

ndb talks to ``DATASTORE_EMULATOR_HOST`` when that is set (the local stack), to Datastore otherwise.
Tests hand in a stub client with ``configure(ndb_client=...)``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

from google.cloud import ndb

from ._config import settings

_lock = threading.Lock()


@functools.cache
def _default_client(project: str | None) -> ndb.Client:
    return ndb.Client(project=project)


def client() -> ndb.Client:
    """The configured ndb client, created once per process."""
    current = settings()
    if current.ndb_client is not None:
        return current.ndb_client
    with _lock:
        return _default_client(current.project)


@contextlib.contextmanager
def ndb_context() -> Iterator[ndb.Context]:
    """Use the caller's ndb context if there is one, else open one on our client.

    gae_deferred's own models opt out of ndb's caches (each is read once per request), so the
    context's cache settings only matter to the task's own code.
    """
    existing = ndb.get_context(raise_context_error=False)
    if existing is not None:
        yield existing
        return
    with client().context() as context:
        yield context
