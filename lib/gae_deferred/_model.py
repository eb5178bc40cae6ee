"""The base of gae_deferred's Datastore kinds."""

from __future__ import annotations

from google.cloud import ndb


class DeferredModel(ndb.Model):
    """Kinds are named after the class with a leading underscore (``_DeferredPayload``), so they
    never collide with an app's own kinds, and bypass ndb's caches: each record is read once
    per request, and a cache would serve stale failure records to the dashboard."""

    _use_cache = False
    _use_global_cache = False

    @classmethod
    def _get_kind(cls) -> str:
        return f"_{cls.__name__}"
