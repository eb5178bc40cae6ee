"""One formatter for an envelope header, for every page that shows one (failure, spilled
payload, task): times, sizes, the deferring request, the signing key id explained; no empty
rows, no Python reprs::

    rows = header_rows(record.meta)
    rows[0]   # {"key": "function", "label": "Function", "text": "reports.build", "url": None}
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from .._signing import signing_key, verification_key
from ..errors import Error
from ._common import PREFIX, deferred_by, format_bytes, url_segment

#: Keys shown in this order first (the rest follow, sorted); written-by keys become one row.
_ORDER = ("function", "args", "created_ms", "eta_ms", "task", "queue", "raw_bytes", "body_bytes")
_WRITTEN_BY = ("app_version", "python", "cloudpickle", "serializer")


def _time(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return json.dumps(value, default=str)
    try:
        moment = datetime.datetime.fromtimestamp(value / 1000, datetime.UTC)
    except (OverflowError, ValueError, OSError):  # unsigned: anyone may write 1e20 or NaN here
        return json.dumps(value, default=str)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC"


def _size(value: Any) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return json.dumps(value, default=str)
    return f"{format_bytes(value)} ({value:,} bytes)" if value >= 1024 else format_bytes(value)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _kid(value: Any) -> str:
    kid = str(value)
    try:
        current = signing_key()[0]
        known = verification_key(kid) is not None
    except Error:
        return f"{kid}: id of the key that signed this envelope (no signing key configured here)"
    if kid == current:
        which = "the current signing key"
    elif known:
        which = "a previous signing key this app still accepts"
    else:
        which = "a key this app does not know: the task would be refused"
    return f"{kid}: id of the key that signed this envelope ({which})"


def _row(key: str, label: str, text: str, url: str | None = None) -> dict[str, Any]:
    return {"key": key, "label": label, "text": text, "url": url}


def header_rows(header: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The header as labelled rows, formatted for people (display only: unverified)."""
    header = dict(header or {})
    rows: list[dict[str, Any]] = []
    keys = [key for key in _ORDER if key in header]
    keys += sorted(key for key in header if key not in _ORDER and key not in _WRITTEN_BY)
    for key in keys:
        value = header[key]
        if key == "function":
            rows.append(_row(key, "Function", _text(value)))
        elif key == "args":
            if value not in (None, ""):
                rows.append(_row(key, "Arguments", _text(value)))
        elif key == "created_ms":
            rows.append(_row(key, "Created", _time(value)))
        elif key == "eta_ms":
            rows.append(_row(key, "Scheduled for", _time(value)))
        elif key in ("raw_bytes", "body_bytes"):
            label = "Pickled size" if key == "raw_bytes" else "Size in the task"
            rows.append(_row(key, label, _size(value)))
        elif key == "task":
            queue = header.get("queue")
            url = (
                f"{PREFIX}/queues/{url_segment(str(queue))}/tasks/{url_segment(str(value))}"
                if queue
                else None
            )
            rows.append(_row(key, "Task", _text(value), url))
        elif key == "queue":
            url = f"{PREFIX}/queues/{url_segment(str(value))}"
            rows.append(_row(key, "Queue", _text(value), url))
        elif key == "kid":
            rows.append(_row(key, "Signing key id", _kid(value)))
        elif key == "request":
            origin = deferred_by(header)
            text = (
                f"{origin['path'] or '(no path)'}"
                + (f", trace {origin['trace_id']}" if origin["trace_id"] else "")
                if origin
                else _text(value)
            )
            rows.append(_row(key, "Deferred by", text, origin["logs_url"] if origin else None))
        elif key == "ref" and isinstance(value, Mapping):
            payload = str(value.get("id", ""))
            stored = value.get("stored_bytes")
            text = payload + (f", {format_bytes(stored)} stored" if isinstance(stored, int) else "")
            rows.append(
                _row(
                    key,
                    "Spilled payload",
                    text,
                    f"{PREFIX}/spillover/{url_segment(payload)}" if payload else None,
                )
            )
        else:
            rows.append(_row(key, key.replace("_", " ").capitalize(), _text(value)))
    written = [key for key in _WRITTEN_BY if key in header]
    if written:
        parts = []
        if "app_version" in header:
            parts.append(f"app version {_text(header['app_version'])}")
        if "python" in header:
            parts.append(f"Python {_text(header['python'])}")
        if "cloudpickle" in header:
            parts.append(f"cloudpickle {_text(header['cloudpickle'])}")
        text = ", ".join(parts)
        if "serializer" in header:
            text += f" ({_text(header['serializer'])})" if text else _text(header["serializer"])
        rows.append(_row("written_by", "Written by", text))
    return rows
