"""Filters of the failure and spillover lists: parsed from a request, served by one index."""

from __future__ import annotations

import abc
import dataclasses
import datetime
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from google.cloud import ndb

from .. import _facets, audit, failures, spillover
from .._model import MAX_INDEXED_CHARS
from ..errors import BadRequest, CountChanged, NotFound
from ..spillover import PayloadState
from ._common import (
    _RELATIVE_TIME,
    FAILURE_SORTS,
    FAILURE_VIEWS,
    LIST_COUNT_CAP,
    MAX_BULK,
    MAX_MATCHING,
    SPILL_SORTS,
    BulkResult,
    _apply,
    _now,
)


def parse_time(value: str | None, name: str) -> datetime.datetime | None:
    """``15m``, ``2h``, ``7d`` (that long ago) or an ISO date/time (UTC unless it says)."""
    if not value:
        return None
    relative = _RELATIVE_TIME.match(value)
    if relative:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[relative.group(2)]
        return _now() - datetime.timedelta(**{unit: int(relative.group(1))})
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadRequest(f"{name} must be like 2h, 7d or 2026-01-31T12:00, not {value!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


@dataclasses.dataclass(frozen=True)
class _Filter(abc.ABC):
    """What a list shows: parsed once from request parameters, turned back into URL params."""

    #: Request parameter names, in the order URLs list them.
    FIELDS: ClassVar[tuple[str, ...]] = ()
    since: str = ""
    until: str = ""

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Any:
        """A filter from request parameters (unknown ones ignored); BadRequest if invalid."""
        values = {
            name: str(params.get(name) or "").strip()
            for name in cls.FIELDS
            if params.get(name) not in (None, "")
        }
        wanted = cls(**values)
        wanted.validate()
        return wanted

    def params(self) -> dict[str, str]:
        """The non-default parameters, for shareable links and the JSON API."""
        default = type(self)()
        return {
            name: getattr(self, name)
            for name in self.FIELDS
            if getattr(self, name) != getattr(default, name)
        }

    def window(self) -> tuple[datetime.datetime | None, datetime.datetime | None]:
        return parse_time(self.since, "since"), parse_time(self.until, "until")

    @abc.abstractmethod
    def tokens(self) -> list[str]:
        """The facet tokens the index query must match, one per set filter."""

    def validate(self) -> None:
        self.window()
        self.tokens()

    def scope(self) -> str:
        """What a cursor is valid for: these exact filters."""
        return json.dumps([type(self).__name__, self.params()], sort_keys=True)


def _function_token(function: str) -> str:
    return f"fn:{function}"[:MAX_INDEXED_CHARS]


@dataclasses.dataclass(frozen=True)
class FailureFilter(_Filter):
    """Failure list filters: every one optional, all combined (AND).

    ``function`` a dotted prefix of the function name, ``exception`` a qualified or bare class
    name, ``namespace`` the Datastore namespace the task runs in, ``q`` words that must all
    appear in the message, ``since``/``until`` bound ``last_seen``, ``group`` one failures-page
    group (``function|exception_type``).
    """

    FIELDS: ClassVar[tuple[str, ...]] = (
        "state",
        "function",
        "exception",
        "queue",
        "namespace",
        "q",
        "group",
        "since",
        "until",
        "sort",
    )
    state: str = "all"
    function: str = ""
    exception: str = ""
    queue: str = ""
    namespace: str = ""
    q: str = ""
    group: str = ""
    sort: str = "newest"

    def tokens(self) -> list[str]:
        if self.state != "all" and self.state not in FAILURE_VIEWS:
            raise BadRequest(f"state must be all or one of {', '.join(FAILURE_VIEWS)}")
        if self.sort not in FAILURE_SORTS:
            raise BadRequest(f"sort must be one of {', '.join(FAILURE_SORTS)}")
        tokens = [] if self.state == "all" else [f"state:{self.state}"]
        if self.function:
            tokens.append(_function_token(self.function))
        if self.exception:
            tokens.append(f"exc:{self.exception}"[:MAX_INDEXED_CHARS])
        if self.queue:
            tokens.append(f"queue:{self.queue}"[:MAX_INDEXED_CHARS])
        if self.namespace:
            tokens.append(_facets.namespace_token(self.namespace))
        if self.group:
            function, _, exception_type = self.group.rpartition("|")
            tokens += [f"fx:{function}"[:MAX_INDEXED_CHARS], f"exc:{exception_type}"]
        words = _facets.words(self.q)
        if self.q and not words:
            raise BadRequest("search words need at least 2 letters or digits")
        return list(dict.fromkeys([*tokens, *(f"w:{word}" for word in words)]))

    def query(self) -> ndb.Query:
        model = failures.DeferredFailure
        conditions = [model.facets == token for token in self.tokens()]
        since, until = self.window()
        if not (since or until):
            return model.query(*conditions).order(FAILURE_SORTS[self.sort])
        if self.sort == "attempts":
            raise BadRequest("a time range lists by time: sort newest or oldest")
        return _time_range(
            model.query(*conditions), model.last_seen, model.seen_desc, since, until, self.sort
        )

    def describe(self) -> str:
        labels = {"q": "message words", "since": "seen since", "until": "seen before"}
        parts = [
            f"{labels.get(name, name)} {value}"
            for name, value in self.params().items()
            if name != "sort"
        ]
        return "every failure" if not parts else "failures with " + ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class SpillFilter(_Filter):
    """Spilled-payload filters: ``state`` (always), dotted ``function`` prefix, ``queue``,
    ``namespace`` (the Datastore namespace the task runs in),
    ``since``/``until`` on ``created`` (with the oldest/newest sorts)."""

    FIELDS: ClassVar[tuple[str, ...]] = (
        "state",
        "function",
        "queue",
        "namespace",
        "since",
        "until",
        "sort",
    )
    state: str = PayloadState.PENDING.value
    function: str = ""
    queue: str = ""
    namespace: str = ""
    sort: str = "oldest"

    def tokens(self) -> list[str]:
        if self.state not in list(PayloadState):
            raise BadRequest(f"state must be one of {', '.join(PayloadState)}")
        if self.sort not in SPILL_SORTS:
            raise BadRequest(f"sort must be one of {', '.join(SPILL_SORTS)}")
        tokens = [f"state:{self.state}"]
        if self.function:
            tokens.append(_function_token(self.function))
        if self.queue:
            tokens.append(f"queue:{self.queue}"[:MAX_INDEXED_CHARS])
        if self.namespace:
            tokens.append(_facets.namespace_token(self.namespace))
        return tokens

    def query(self) -> ndb.Query:
        model = spillover.DeferredPayload
        conditions = [model.facets == token for token in self.tokens()]
        since, until = self.window()
        if not (since or until):
            return model.query(*conditions).order(SPILL_SORTS[self.sort])
        if self.sort not in ("oldest", "newest"):
            raise BadRequest("a time range lists by time: sort oldest or newest")
        return _time_range(
            model.query(*conditions), model.created, model.created_desc, since, until, self.sort
        )

    def describe(self) -> str:
        parts = [f"{name} {value}" for name, value in self.params().items() if name != "sort"]
        return f"{self.state} spilled payloads" + (" with " + ", ".join(parts) if parts else "")


def _time_range(
    query: ndb.Query,
    ascending: Any,
    descending_ms: Any,
    since: datetime.datetime | None,
    until: datetime.datetime | None,
    sort: str,
) -> ndb.Query:
    """``query`` limited to [since, until), oldest or newest first.

    The range is the only inequality and the query is ordered by the range's own property,
    ascending (one (facets, property) index serves it); "newest" ranges over and sorts by the
    negated copy of the time. The order is always explicit: without it a query with several
    equality filters came back in whatever order the backend joined them (oldest first on the
    stub and the emulator, whatever ``sort`` said).
    """
    if sort == "newest":
        if since:
            query = query.filter(descending_ms <= _facets.descending_ms(since))
        if until:
            query = query.filter(descending_ms > _facets.descending_ms(until))
        return query.order(descending_ms)
    if since:
        query = query.filter(ascending >= since)
    if until:
        query = query.filter(ascending < until)
    return query.order(ascending)


def count_matching(wanted: FailureFilter | SpillFilter, cap: int = MAX_MATCHING) -> int:
    """How many records the filter matches, counting at most ``cap`` (keys only)."""
    return wanted.query().count(limit=cap)


def list_total_async(wanted: FailureFilter | SpillFilter) -> ndb.Future:
    """Start counting what a list's filter matches (for "51 to 100 of 137"): a keys-only
    count of at most LIST_COUNT_CAP + 1 index entries, running while the page is read. Pass
    the future to :func:`list_total`."""
    return wanted.query().count_async(limit=LIST_COUNT_CAP + 1)


def list_total(counting: ndb.Future) -> tuple[int, bool]:
    """(count, capped) of a :func:`list_total_async` count (capped: "more than 1,000")."""
    count = counting.result()
    return min(count, LIST_COUNT_CAP), count > LIST_COUNT_CAP


def _matching_ids(wanted: FailureFilter | SpillFilter) -> list[str]:
    keys = wanted.query().fetch(MAX_MATCHING, keys_only=True)
    return [key.id() for key in keys]


def _bulk_matching(
    action: str,
    wanted: FailureFilter | SpillFilter,
    actor: str,
    what: str,
    one: Callable[[str], object],
    expected: int | None = None,
) -> BulkResult:
    """Act on every record ``wanted`` matches (at most MAX_MATCHING); with ``expected`` (the
    count a person confirmed) only when exactly that many match now, else CountChanged and
    nothing is done. The ids are read once: records matching later are never touched."""
    ids = _matching_ids(wanted)
    if expected is not None and len(ids) != expected:
        raise CountChanged(expected, len(ids))
    if not ids:
        raise NotFound(f"no {what} record matches {wanted.describe()}")
    result = BulkResult([], {})
    for start in range(0, len(ids), MAX_BULK):
        batch = _apply(ids[start : start + MAX_BULK], one)
        result.done += batch.done
        result.errors.update(batch.errors)
    audit.record(
        actor,
        f"bulk {action}",
        f"{what}?{json.dumps(wanted.params(), sort_keys=True)}",
        f"{wanted.describe()}: {result.summary} (at most {MAX_MATCHING})",
    )
    return result
