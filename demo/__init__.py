"""Local-only demo page at ``/``: one button per kind of task, to see every dashboard state.

main.py routes it only when ``gae_deferred.settings().local_mode`` is on (``make run``)::

    if gae_deferred.settings().local_mode:
        routes += demo_routes()

``GET /`` shows the buttons and the last demo runs; ``POST /demo/<kind>`` defers one task and
redirects back with a flash message naming it. Forms carry a double-submit CSRF token: a random
value in a SameSite=Strict cookie that the form must echo in ``csrf_token``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import logging
import os
import pathlib
import secrets
import time
from collections.abc import Callable

import jinja2
import webapp2

import gae_deferred
from demo import tasks as demo_tasks
from gae_deferred import ndb_context

logger = logging.getLogger("gae_deferred.demo")

TEMPLATES = pathlib.Path(__file__).resolve().parent.parent / "templates"
CSRF_COOKIE = "demo_csrf"
FLASH_COOKIE = "demo_flash"
COUNTDOWN_SECONDS = 60
SPILL_BYTES = 600 * 1024
CHUNKED_BYTES = 3 * 1024 * 1024
RECENT_RUNS = 15

_jinja = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    autoescape=jinja2.select_autoescape(["html"], default_for_string=True),
    undefined=jinja2.StrictUndefined,
)


def _closure() -> gae_deferred.DeferredTask:
    created = time.strftime("%H:%M:%S")
    # A lambda capturing a local: cloudpickle ships the code and the captured value.
    return gae_deferred.defer(lambda: demo_tasks.record_run("closure", "ok", f"from {created}"))


@dataclasses.dataclass(frozen=True)
class DemoKind:
    """One button: what it defers and what the dashboard will show for it."""

    label: str
    explains: str
    defer: Callable[[], gae_deferred.DeferredTask]


# Random bytes: the envelope compresses bodies, and repeated bytes would shrink below the limit.
KINDS: dict[str, DemoKind] = {
    "quick": DemoKind(
        "Quick task",
        "runs at once; nothing on the dashboard",
        lambda: gae_deferred.defer(demo_tasks.quick, "hello from the demo page"),
    ),
    "closure": DemoKind("Closure", "a lambda capturing a local variable", _closure),
    "spill": DemoKind(
        "600 KB argument",
        "spilled to Datastore; the record disappears after the run",
        lambda: gae_deferred.defer(demo_tasks.consume, "spill", os.urandom(SPILL_BYTES)),
    ),
    "chunked": DemoKind(
        "3 MB argument",
        "spilled in several 1 MB chunks",
        lambda: gae_deferred.defer(demo_tasks.consume, "chunked", os.urandom(CHUNKED_BYTES)),
    ),
    "flaky": DemoKind(
        "Fails twice, then succeeds",
        "a failure record that ends up resolved",
        lambda: gae_deferred.defer(demo_tasks.flaky),
    ),
    "always-fails": DemoKind(
        "Always fails",
        "retried with backoff until the retry limit, then dead",
        lambda: gae_deferred.defer(demo_tasks.always_fails),
    ),
    "permanent": DemoKind(
        "PermanentTaskFailure",
        "recorded as permanent, never retried",
        lambda: gae_deferred.defer(demo_tasks.permanent),
    ),
    "countdown": DemoKind(
        f"{COUNTDOWN_SECONDS} s countdown",
        "waits in the queue, then runs",
        lambda: gae_deferred.defer(
            demo_tasks.quick, "countdown elapsed", _countdown=COUNTDOWN_SECONDS
        ),
    ),
}


_FLASH_KEYS = frozenset({"kind", "label", "task", "queue", "spilled", "payload_bytes"})
_ERROR_KEYS = frozenset({"kind", "error"})


def _encode_flash(data: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def _decode_flash(value: str | None) -> dict[str, str] | None:
    """A malformed cookie is ignored: the flash is a convenience, never trusted."""
    if not value:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(value.encode()))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(data, dict) or not (_FLASH_KEYS.issubset(data) or _ERROR_KEYS.issubset(data)):
        return None
    return {str(k): str(v) for k, v in data.items()}


class DemoPage(webapp2.RequestHandler):
    """GET /: the buttons, the flash of the last POST, and the latest demo runs."""

    def get(self) -> None:
        token = self.request.cookies.get(CSRF_COOKIE) or ""
        if len(token) < 32:
            token = secrets.token_urlsafe(32)
            self.response.set_cookie(CSRF_COOKIE, token, path="/", httponly=True, samesite="strict")
        flash = _decode_flash(self.request.cookies.get(FLASH_COOKIE))
        if flash is not None:
            self.response.delete_cookie(FLASH_COOKIE, path="/")
        runs, runs_error = _recent_runs()
        html = _jinja.get_template("demo/index.html").render(
            kinds=KINDS,
            csrf_token=token,
            flash=flash,
            runs=runs,
            runs_error=runs_error,
            dashboard="/_ah/deferred-admin",
        )
        self.response.content_type = "text/html"
        self.response.headers["Cache-Control"] = "no-store"
        self.response.write(html)


class DemoDefer(webapp2.RequestHandler):
    """POST /demo/<kind>: defer one task, then redirect to / with a flash naming it."""

    def post(self, kind: str) -> None:
        cookie = self.request.cookies.get(CSRF_COOKIE) or ""
        form = self.request.POST.get("csrf_token") or ""
        if not cookie or not hmac.compare_digest(cookie.encode(), str(form).encode()):
            self._plain(403, "CSRF token missing or wrong: reload the demo page and try again")
            return
        demo = KINDS.get(kind)
        if demo is None:
            self._plain(404, f"no demo task {kind!r}; known: {', '.join(KINDS)}")
            return
        try:
            # Like any handler that touches Datastore, run in an ndb context (spills need one).
            with ndb_context():
                task = demo.defer()
        except gae_deferred.Error as exc:
            logger.exception("demo %s could not be deferred", kind)
            flash = {"kind": kind, "error": f"{type(exc).__name__}: {exc}"}
        else:
            flash = {
                "kind": kind,
                "label": demo.label,
                "task": task.name,
                "queue": task.queue,
                "spilled": "yes" if task.spilled else "no",
                "payload_bytes": f"{task.payload_bytes:,}",
            }
        self.response.set_cookie(
            FLASH_COOKIE, _encode_flash(flash), path="/", httponly=True, samesite="strict"
        )
        self.redirect("/")

    def _plain(self, status: int, text: str) -> None:
        self.response.status_int = status
        self.response.content_type = "text/plain"
        self.response.write(text + "\n")


def _recent_runs() -> tuple[list[demo_tasks.DemoRun], str | None]:
    """The latest runs; a Datastore outage shows as a message, not as a broken page."""
    try:
        with ndb_context():
            query = demo_tasks.DemoRun.query().order(-demo_tasks.DemoRun.when)
            return query.fetch(RECENT_RUNS), None
    except Exception as exc:
        logger.warning("demo page could not list runs: %s", exc)
        return [], f"Datastore unavailable: {type(exc).__name__}"


def demo_routes() -> list[webapp2.Route]:
    """``/`` and ``/demo/<kind>``; main.py adds them in local mode only."""
    return [
        webapp2.Route("/", DemoPage, methods=["GET"]),
        webapp2.Route("/demo/<kind:[a-z-]+>", DemoDefer, methods=["POST"]),
    ]
