"""Search tokens for the dashboard's filters, stored in one indexed list property per record.

Datastore serves several equality filters on one list property with a single composite index
(``facets`` + the sort), so every combination of filters needs only one index per sort::

    facets(state="dead", queue="default", function="reports.build", message="Deadline exceeded")
    # ['state:dead', 'queue:default', 'fn:reports', 'fn:reports.build', 'fx:reports.build',
    #  'w:deadline', 'w:exceeded']

What matches: ``fn:`` every dotted prefix of the function (``reports`` matches
``reports.build``), ``fx:`` the exact function, ``exc:`` the exception's qualified name and its
class name, ``ns:`` the namespace the task runs in, ``w:`` the first :data:`MAX_WORDS` distinct
words of the message (lower case, letters/digits/underscore, 2 to :data:`MAX_WORD_CHARS`
characters).
"""

from __future__ import annotations

import datetime
import re

from ._model import MAX_INDEXED_CHARS

MAX_WORDS = 40
MAX_WORD_CHARS = 40
_WORD = re.compile(r"[^\W]{2,}", re.UNICODE)
#: Words are read from this much of the message: the index is for finding, not full text.
_MESSAGE_CHARS = 2000


def function_tokens(function: str) -> list[str]:
    """``fn:`` tokens of every dotted prefix and the ``fx:`` token of the exact name."""
    parts = function.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return [f"fn:{prefix}"[:MAX_INDEXED_CHARS] for prefix in prefixes] + [
        f"fx:{function}"[:MAX_INDEXED_CHARS]
    ]


def exception_tokens(exception_type: str) -> list[str]:
    """The qualified name and the bare class name (``requests.Timeout`` and ``Timeout``)."""
    names = {exception_type, exception_type.rsplit(".", 1)[-1]}
    return sorted(f"exc:{name}"[:MAX_INDEXED_CHARS] for name in names)


def namespace_token(namespace: str) -> str:
    """``ns:`` and the Datastore namespace the task runs in (none for the default one)."""
    return f"ns:{namespace}"[:MAX_INDEXED_CHARS]


def words(text: str) -> list[str]:
    """The distinct searchable words of ``text``, in order of appearance."""
    found: dict[str, None] = {}
    for match in _WORD.finditer(text[:_MESSAGE_CHARS].lower()):
        found.setdefault(match.group()[:MAX_WORD_CHARS], None)
        if len(found) >= MAX_WORDS:
            break
    return list(found)


def facets(
    *,
    state: str | None = None,
    queue: str | None = None,
    function: str | None = None,
    exception_type: str | None = None,
    message: str | None = None,
    namespace: str | None = None,
) -> list[str]:
    """Every token of a record; the dashboard's filters are equality filters on these."""
    tokens = []
    if state:
        tokens.append(f"state:{state}")
    if queue:
        tokens.append(f"queue:{queue}"[:MAX_INDEXED_CHARS])
    if namespace:
        tokens.append(namespace_token(namespace))
    if function:
        tokens += function_tokens(function)
    if exception_type:
        tokens += exception_tokens(exception_type)
    if message:
        tokens += [f"w:{word}" for word in words(message)]
    return list(dict.fromkeys(tokens))


def descending_ms(when: datetime.datetime | None) -> int | None:
    """Minus the milliseconds since the epoch: ascending order of this is newest first."""
    return -int(when.timestamp() * 1000) if when is not None else None
