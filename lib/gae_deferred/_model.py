"""The base of gae_deferred's Datastore kinds."""

from __future__ import annotations

from typing import Any

from google.cloud import ndb

#: Datastore caps an indexed string at 1,500 bytes; indexed text we write is cut at this many
#: characters (at most 3 bytes each in UTF-8 for anything but rare 4-byte characters).
MAX_INDEXED_CHARS = 500
#: The Datastore namespace of every gae_deferred record (the default namespace), whatever the
#: namespace of the context that defers, runs or lists a task: the handler, the sweeper and
#: the dashboard find every tenant's payloads, failures and metrics in one place.
LIBRARY_NAMESPACE = ""
#: Datastore (and Google's emulators) refuse a key name over 1,500 bytes of UTF-8, even to look
#: it up ("The key path element name is longer than 1500 bytes"), and writes of ``__x__`` names.
MAX_KEY_NAME_BYTES = 1500


def is_key_name(value: object) -> bool:
    """Whether Datastore takes ``value`` as a key name: a non-empty str of at most 1,500 bytes
    of UTF-8 (a lone surrogate has none), not of the reserved form ``__x__``."""
    if not isinstance(value, str) or not value or (value[:2] == "__" and value[-2:] == "__"):
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_KEY_NAME_BYTES
    except UnicodeEncodeError:
        return False


class DeferredModel(ndb.Model):
    """Kinds are named after the class with a leading underscore (``_DeferredPayload``), so they
    never collide with an app's own kinds, and bypass ndb's caches: each record is read once
    per request, and a cache would serve stale failure records to the dashboard."""

    _use_cache = False
    _use_global_cache = False

    @classmethod
    def _get_kind(cls) -> str:
        return f"_{cls.__name__}"

    @classmethod
    def _query(cls, *filters: Any, **options: Any) -> ndb.Query:
        """Queries of gae_deferred's kinds look in LIBRARY_NAMESPACE, not the context's."""
        options.setdefault("namespace", LIBRARY_NAMESPACE)
        return super()._query(*filters, **options)

    query = _query


def root_key(model: type[DeferredModel], identifier: str | int | None) -> ndb.Key:
    """The key of a root record of gae_deferred, in LIBRARY_NAMESPACE (``None``: incomplete)."""
    return ndb.Key(model, identifier, namespace=LIBRARY_NAMESPACE)
