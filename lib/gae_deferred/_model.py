"""The base of gae_deferred's Datastore kinds."""

from __future__ import annotations

from google.cloud import ndb

#: Datastore caps an indexed string at 1,500 bytes; indexed text we write is cut at this many
#: characters (at most 3 bytes each in UTF-8 for anything but rare 4-byte characters).
MAX_INDEXED_CHARS = 500


class DeferredModel(ndb.Model):
    """Kinds are named after the class with a leading underscore (``_DeferredPayload``), so they
    never collide with an app's own kinds, and bypass ndb's caches: each record is read once
    per request, and a cache would serve stale failure records to the dashboard."""

    _use_cache = False
    _use_global_cache = False

    @classmethod
    def _get_kind(cls) -> str:
        return f"_{cls.__name__}"
