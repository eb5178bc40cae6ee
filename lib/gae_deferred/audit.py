"""Who did what on the dashboard: one ``_DeferredAudit`` record per state-changing action.

Every retrigger, delete, dismiss, purge, pause, resume, run and sweep goes through
:func:`record`; the audit page lists the newest first::

    from gae_deferred import audit

    audit.record("ops@example.com", "retrigger", "spillover/1f2e", "new task r-9a8b")
    entries, next_cursor = audit.recent(limit=50)
"""

from __future__ import annotations

import datetime

from google.cloud import ndb

from ._model import MAX_INDEXED_CHARS, DeferredModel, root_key

_MAX_DETAIL_CHARS = 2000


class DeferredAudit(DeferredModel):
    """One dashboard action: ``actor`` did ``action`` to ``target`` at ``when``."""

    actor = ndb.StringProperty()
    action = ndb.StringProperty()
    target = ndb.StringProperty()
    when = ndb.DateTimeProperty(tzinfo=datetime.UTC)
    #: Free text for humans, e.g. the name of the task a retrigger created.
    detail = ndb.TextProperty()


def record(actor: str, action: str, target: str, detail: str = "") -> DeferredAudit:
    """Write one audit entry now and return it.

    >>> record("local (127.0.0.1)", "purge", "queue/default")  # doctest: +SKIP
    """
    entry = DeferredAudit(
        key=root_key(DeferredAudit, None),
        actor=actor[:MAX_INDEXED_CHARS],
        action=action[:MAX_INDEXED_CHARS],
        target=target[:MAX_INDEXED_CHARS],
        when=datetime.datetime.now(datetime.UTC),
        detail=detail[:_MAX_DETAIL_CHARS],
    )
    entry.put()
    return entry


def recent(
    limit: int = 50, cursor: ndb.Cursor | None = None
) -> tuple[list[DeferredAudit], ndb.Cursor | None]:
    """One page of entries, newest first, and the cursor of the next page (None at the end).

    Served by Datastore's built-in single-property index on ``when``.
    """
    query = DeferredAudit.query().order(-DeferredAudit.when)
    entries, next_cursor, more = query.fetch_page(limit, start_cursor=cursor)
    return entries, next_cursor if more else None
