"""The dashboard's Jinja2 environment and filters: autoescaped, strict, found beside the code.

::

    from gae_deferred.webapp2._templates import render
    html = render("failure_detail.html", {"failure": admin.failure_json(record, detail=True)})
"""

from __future__ import annotations

import datetime
import os
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import markupsafe

from gae_deferred import admin

from ._admin_guard import PREFIX

REFRESH_CHOICES = (0, 5, 10, 30, 60)


def _data_dir(name: str) -> str:
    """``templates`` or ``static``: package data beside this module in an installed wheel, the
    repo's top-level folder of that name in a checkout (where this module is ``handlers/``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (here, os.path.dirname(here)):
        candidate = os.path.join(base, name)
        if os.path.isdir(os.path.join(candidate, "deferred_admin")):
            return candidate
    raise RuntimeError(f"gae_deferred.webapp2: no {name}/deferred_admin beside {here}")


TEMPLATE_DIR = _data_dir("templates")
STATIC_DIR = os.path.join(_data_dir("static"), "deferred_admin")


def _when(value: datetime.datetime | str | None) -> datetime.datetime | None:
    if isinstance(value, str):
        return datetime.datetime.fromisoformat(value)
    return value


def age(value: datetime.datetime | str | float | None) -> str:
    """'3d 4h', '5m 2s' ... for a datetime (or ISO string) in the past or a number of seconds."""
    if value is None:
        return "-"
    if not isinstance(value, int | float):
        moment = _when(value)
        if moment is None:
            return "-"
        value = (datetime.datetime.now(datetime.UTC) - moment).total_seconds()
    seconds = max(0, int(value))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} {seconds % size // sub_size}{sub}"
    return f"{seconds // 60}m {seconds % 60}s" if seconds >= 60 else f"{seconds}s"


def ago(value: datetime.datetime | str | None) -> markupsafe.Markup:
    """``3m 2s ago`` with the exact time on hover (and in ``datetime`` for scripts)."""
    moment = _when(value)
    if moment is None:
        return markupsafe.Markup("-")
    return markupsafe.Markup('<time datetime="{}" title="{}">{} ago</time>').format(
        moment.isoformat(), timestamp(moment), age(moment)
    )


def due(value: datetime.datetime | str | None) -> markupsafe.Markup:
    """When a scheduled time comes: ``in 4m 10s`` (or ``due now``), the exact time on hover."""
    moment = _when(value)
    if moment is None:
        return markupsafe.Markup("-")
    left = (moment - datetime.datetime.now(datetime.UTC)).total_seconds()
    text = f"in {age(left)}" if left >= 1 else "due now"
    return markupsafe.Markup('<time datetime="{}" title="{}">{}</time>').format(
        moment.isoformat(), timestamp(moment), text
    )


def timestamp(value: datetime.datetime | str | None) -> str:
    moment = _when(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def clock(value: datetime.datetime | str | None) -> str:
    """'14:05' (UTC) for a chart label."""
    moment = _when(value)
    return moment.strftime("%H:%M") if moment else "-"


def day(value: datetime.datetime | str | None) -> str:
    """'Nov 28' for a chart label."""
    moment = _when(value)
    return moment.strftime("%b %d") if moment else "-"


def run_rows(points: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """Chart rows (start, runs, failures) of metrics points."""
    return [(point["start"], point["runs"], point["failures"]) for point in points]


def duration(seconds: float | None) -> str:
    if not seconds:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


def milliseconds(value: float | None) -> str:
    """'120 ms', '1.5 s', '-' for nothing measured."""
    if not value:
        return "-"
    if value >= 1000:
        return f"{value / 1000:g} s"
    return f"{value:g} ms"


def retry(policy: dict[str, Any]) -> str:
    """'6 attempts, backoff 1s-60s (4 doublings), for at most 1d' from a queue's retry dict."""
    if not policy:
        return "-"
    attempts = policy.get("max_attempts")
    parts = ["unlimited attempts" if attempts in (None, -1) else f"{attempts} attempts"]
    parts.append(
        f"backoff {duration(policy.get('min_backoff'))}-{duration(policy.get('max_backoff'))}"
        f" ({policy.get('max_doublings')} doublings)"
    )
    if policy.get("max_retry_duration"):
        parts.append(f"for at most {duration(policy['max_retry_duration'])}")
    return ", ".join(parts)


def segment(value: Any) -> str:
    """An id, queue or task name as one URL path segment (see admin.url_id)."""
    return quote(admin.url_id(str(value)), safe="")


def query(params: dict[str, Any]) -> str:
    """``?a=1&b=2`` of the non-empty parameters, or ``""``."""
    kept = {key: value for key, value in params.items() if value not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters.update(
    age=age,
    ago=ago,
    due=due,
    bytes=admin.format_bytes,
    ts=timestamp,
    clock=clock,
    day=day,
    run_rows=run_rows,
    retry=retry,
    ms=milliseconds,
    seg=segment,
    query=query,
)
environment.globals.update(prefix=PREFIX, refresh_choices=REFRESH_CHOICES)


def render(template: str, context: dict[str, Any]) -> str:
    """Render ``templates/deferred_admin/<template>``."""
    return environment.get_template(f"deferred_admin/{template}").render(context)
