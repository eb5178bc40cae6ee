"""/_ah/deferred-admin: the dashboard's HTML pages, actions and JSON API (webapp2).

Handlers only parse the request, call :mod:`gae_deferred.admin` (which also shapes every
record as JSON) and answer with :meth:`_Base.respond` (a page, or the same data as JSON under
``/_ah/deferred-admin/api/``) or :meth:`_Base.finish` (an action: JSON, or ``303 See Other``
back to the page with a one-time message). Every request is authenticated (``_admin_auth``;
default deny), every POST is CSRF-checked (``_admin_csrf``) and reads its parameters from the
body only, and every response carries the security headers of ``_admin_guard``. Pages work
without JavaScript: confirmations are server-rendered forms, "expand" is ``<details>``,
auto-refresh is a meta refresh::

    app = deferred_middleware(webapp2.WSGIApplication(MY_ROUTES + deferred_routes()))
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import re
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

import webapp2

from gae_deferred import Error, admin, audit, metrics, ndb_context, refusals

from . import _admin_auth, _admin_csrf, _scrape_auth, _templates
from . import _admin_guard as guard

logger = logging.getLogger("gae_deferred.admin")

PREFIX = guard.PREFIX
SECURITY_HEADERS = guard.SECURITY_HEADERS
FLASH_COOKIE = "deferred_admin_flash"
REFRESH_COOKIE = "deferred_admin_refresh"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(css|svg|js|png|ico)$")
#: Pages whose cursors a list URL remembers for its "Previous" link.
_TRAIL = 30
#: A flash message is a cookie: keep it well under the 4 KB browsers allow.
_FLASH_CHARS = 1500
#: Browsers keep a cookie of at most 4,096 bytes (name and value), and gunicorn refuses a
#: Cookie header over 8,190: a flash naming long ids gives up links, then text, to fit.
_FLASH_COOKIE_BYTES = 3800


#: What a Location header may carry as it is: printable ASCII but space, quotes and brackets
#: (``%`` included: escapes already in the value stay as they are).
_LOCATION_SAFE = "!#$%&'()*+,/:;=?@~-._"


def _sealed_flash(text: str, links: list[tuple[str, str]]) -> str:
    """The flash cookie's value, at most _FLASH_COOKIE_BYTES: links dropped from the last,
    then the text halved (marked with an ellipsis) until it fits."""

    def sealed(text: str, links: list[tuple[str, str]]) -> str:
        return admin.seal_message(json.dumps({"text": text, "links": links}, ensure_ascii=False))

    links = list(links)
    value = sealed(text, links)
    while len(value) > _FLASH_COOKIE_BYTES and links:
        links.pop()
        value = sealed(text, links)
    keep = len(text)
    while len(value) > _FLASH_COOKIE_BYTES:
        keep //= 2
        value = sealed(text[:keep] + "…", links)
    return value


def _safe_back(value: str, default: str) -> str:
    """``value`` when it is a dashboard page of this site (a form's ``back`` field), with
    everything but printable ASCII percent-encoded; otherwise ``default``.

    Checked as the browser will resolve it: percent-escapes decoded (``%2e%2e`` is ``..``),
    then no ``.``/``..`` segment, no empty segment, no backslash, no control character.
    """
    if not value or len(value) > 4000:
        return default
    parts = urlsplit(value)
    decoded = unquote(parts.path)
    if parts.scheme or parts.netloc or "\\" in decoded:
        return default
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value + unquote(value)):
        return default
    inside = decoded == PREFIX or decoded.startswith(PREFIX + "/")
    segments = decoded[len(PREFIX) :].split("/")[1:]
    if not inside or any(segment in ("", ".", "..") for segment in segments):
        return default
    return quote(value, safe=_LOCATION_SAFE)


class _Base(webapp2.RequestHandler):
    """Auth, CSRF, an ndb context, answers and error pages for every admin request."""

    #: True on the /api/ twin of a handler: JSON in and out, no confirmation pages.
    json_api: ClassVar[bool] = False
    admin_user: _admin_auth.Admin | None = None
    csrf_token = ""

    def dispatch(self) -> None:
        self.response.headers.update(SECURITY_HEADERS)
        refused = guard.refusal(self.request.environ)
        if refused is not None:
            self.fail(*refused)
            return
        try:
            self.request.GET  # noqa: B018 - parse the query string once, here
            if self.request.method == "POST":
                self.request.POST  # noqa: B018 - and the form
        except UnicodeDecodeError:
            # The error page reads the query string too: drop what cannot be decoded.
            self.request.environ["QUERY_STRING"] = ""
            self.fail(400, "The query string or form is not valid UTF-8.")
            return
        try:
            self.admin_user = self._authenticate()
        except _admin_auth.KeysUnavailable as exc:
            logger.error("dashboard: %s", exc)
            self.fail(503, "Cannot check the IAP login now (its public keys did not load).")
            return
        if self.admin_user is None:
            self.fail(403, self._denial())
            return
        secret, fresh = _admin_csrf.cookie_secret(self.request)
        if fresh:
            _admin_csrf.set_cookie(self.response, self.request, secret)
        self.csrf_token = _admin_csrf.token_for(secret)
        if self.request.method == "POST" and not _admin_csrf.valid(self.request):
            self.fail(403, "CSRF token missing or wrong: reload the page and try again.")
            return
        if self.request.method == "POST" and not self.admin_user.can_act:
            self._refuse_viewer()
            return
        if getattr(self, self.request.method.lower(), None) is None:
            self.fail(405, f"{self.request.method} is not allowed here.")
            return
        with ndb_context():
            super().dispatch()

    def _authenticate(self) -> _admin_auth.Admin | None:
        return _admin_auth.authenticate(self.request.environ)

    def _refuse_viewer(self) -> None:
        """A viewer posted an action: 403, and the attempt is audited."""
        with ndb_context():
            audit.record(self.actor, "refused", self.path, "viewers may look but not act")
        self.fail(403, "Viewers may look but not act: ask a dashboard admin.")

    def _denial(self) -> str:
        return _admin_auth.denial(self.request.environ)

    def handle_exception(self, exception: BaseException, debug: bool) -> None:
        if isinstance(exception, admin.AdminError):
            self.fail(exception.status, str(exception))
        elif isinstance(exception, Error):
            self.fail(400, str(exception))
        else:
            logger.exception("dashboard error on %s", guard.raw_path(self.request.environ))
            self.fail(500, "Something went wrong; the details are in the server log.")

    # -- request helpers --------------------------------------------------------------

    @property
    def path(self) -> str:
        """The decoded request path ("" when it is not UTF-8: the guard refuses those)."""
        return guard.request_path(self.request.environ) or ""

    def arg(self, name: str, default: str = "") -> str:
        """A query string parameter (GET pages)."""
        return self.request.GET.get(name, default)

    def field(self, name: str, default: str = "") -> str:
        """A POST parameter: from the JSON body on the API, the form body otherwise; never
        from the query string, so a link cannot smuggle ``confirm`` or ``action`` in."""
        body = self._json_body()
        if body is not None:
            value = body.get(name, default)
            return "" if value is None else str(value)
        return self.request.POST.get(name, default)

    def fields(self, name: str) -> list[str]:
        body = self._json_body()
        if body is not None:
            values = body.get(name, [])
            if not isinstance(values, list):
                raise admin.BadRequest(f"{name} must be a list")
            return [str(value) for value in values]
        return self.request.POST.getall(name)

    def _json_body(self) -> dict[str, Any] | None:
        if self.request.method != "POST" or self.request.content_type != "application/json":
            return None
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError as exc:
            raise admin.BadRequest("the request body is not valid JSON") from exc
        if not isinstance(body, dict):
            raise admin.BadRequest("the request body must be a JSON object")
        return body

    def posted(self) -> dict[str, str]:
        """Every single-valued POST parameter (filters sent with a bulk action)."""
        body = self._json_body()
        if body is not None:
            return {key: str(value) for key, value in body.items() if not isinstance(value, list)}
        return dict(self.request.POST.items())

    def limit(self) -> int:
        return admin.page_size(self.arg("limit") or None)

    # -- responses --------------------------------------------------------------------

    def respond(self, template: str, data: dict[str, Any], **page: Any) -> None:
        """Answer a read: ``data`` as JSON on the API, else ``template`` rendered with the
        same data (and the page-only values in ``page``)."""
        if self.json_api:
            self.send_json(data)
        else:
            self.render(template, **data, **page)

    def _refresh(self) -> int:
        """The auto-refresh period: ``?refresh=`` sets it (and remembers it in a cookie, so it
        follows the user from page to page), else the cookie's; 0 is off."""
        choices = {str(choice) for choice in _templates.REFRESH_CHOICES}
        asked = self.arg("refresh")
        if asked in choices:
            self.response.set_cookie(
                REFRESH_COOKIE,
                asked,
                max_age=30 * 86400,
                path=PREFIX,
                httponly=True,
                samesite="strict",
                secure=self.request.scheme == "https",
            )
            return int(asked)
        remembered = self.request.cookies.get(REFRESH_COOKIE, "0")
        return int(remembered) if remembered in choices else 0

    def render(self, template: str, status: int = 200, **context: Any) -> None:
        context.setdefault("title", "Deferred tasks")
        context.update(
            admin_user=self.admin_user,
            can_act=bool(self.admin_user and self.admin_user.can_act),
            local_mode=bool(self.admin_user and self.admin_user.local_mode),
            csrf_token=self.csrf_token,
            refresh=self._refresh() if self.admin_user is not None else 0,
            page_url=self._url_with,
            paging=self._paging,
            request_path=self.path,
            here=self._here(),
            flash=self._take_flash() if status == 200 else None,
            status=self._status() if self.admin_user is not None else None,
        )
        self.response.status_int = status
        self.response.content_type = "text/html"
        self.response.charset = "utf-8"
        self.response.write(_templates.render(template, context))

    def _status(self) -> dict[str, Any] | None:
        """The status strip's numbers (cached a few seconds); None when they cannot be read
        (an error page must still render)."""
        try:
            return admin.status_strip()
        except Exception:  # Datastore down: the page says so itself; the strip stays away
            logger.exception("dashboard: cannot read the status strip")
            return None

    def _here(self) -> str:
        """This page's URL (path and query), as links and ``back`` fields carry it."""
        query = self.request.environ.get("QUERY_STRING") or ""
        return quote(self.path) + ("?" + query if query else "")

    def _url_with(self, **changes: Any) -> str:
        """This page's URL with some query parameters changed (None removes one)."""
        params = {key: value for key, value in self.request.GET.items() if key not in changes}
        params.update(changes)
        return quote(self.path) + _templates.query(params)

    def _paging(
        self, next_cursor: str | None, shown: int, total: int | None = None, capped: bool = False
    ) -> dict[str, Any]:
        """Previous / next / first links and "51 to 100 of 137" for a list page.

        Cursors only go forward, so the URL carries the cursors of the pages before this one
        (``trail``, "0" for the first page, the last _TRAIL kept) and the page number. ``total``
        is a capped count ("more than N" when ``capped``); without one, the total is known on
        the last page only ("more than N" before it).
        """
        trail = [part for part in self.arg("trail").split(",") if part][-_TRAIL:]
        try:
            number = max(1, int(self.arg("page") or 1))
        except ValueError:
            number = 1
        size = self.limit()
        start = (number - 1) * size + 1 if shown else 0
        end = start + shown - 1 if shown else 0
        if total is not None:
            of = f"more than {total:,}" if capped else f"{total:,}"
        elif next_cursor:
            of = f"more than {end:,}"
        else:
            of = f"{end:,}"
        here = self.arg("cursor") or "0"
        previous = None
        if trail:
            back = trail[-1]
            previous = self._url_with(
                cursor=None if back == "0" else back,
                trail=",".join(trail[:-1]) or None,
                page=number - 1 if number > 2 else None,
            )
        return {
            "start": start,
            "end": end,
            "of": of,
            "previous": previous,
            "next": (
                self._url_with(cursor=next_cursor, trail=",".join([*trail, here]), page=number + 1)
                if next_cursor
                else None
            ),
            "first": (self._url_with(cursor=None, trail=None, page=None) if number > 1 else None),
        }

    def _take_flash(self) -> dict[str, Any] | None:
        """The one-time result of the last action: ``{"text", "links": [[label, url]]}``."""
        sealed = self.request.cookies.get(FLASH_COOKIE)
        if not sealed:
            return None
        self.response.delete_cookie(FLASH_COOKIE, path=PREFIX)
        opened = admin.open_message(sealed)
        if opened is None:
            return None
        try:
            flash = json.loads(opened)
        except ValueError:
            return None
        if not isinstance(flash, dict) or not isinstance(flash.get("text"), str):
            return None
        links = [
            (str(label), str(url))
            for label, url in flash.get("links") or []
            if _safe_back(str(url), "") == str(url)
        ]
        return {"text": flash["text"], "links": links}

    def send_json(self, data: Any, status: int = 200) -> None:
        self.response.status_int = status
        self.response.content_type = "application/json"
        self.response.charset = "utf-8"
        self.response.write(json.dumps(data, default=str))

    def fail(self, status: int, message: str) -> None:
        self.response.clear()
        self.response.headers.update(SECURITY_HEADERS)
        if self.json_api or guard.raw_path(self.request.environ).startswith(f"{PREFIX}/api/"):
            self.send_json({"error": message, "status": status}, status)
            return
        self.render("error.html", status=status, title=f"Error {status}", message=message)

    def finish(
        self,
        message: str,
        back: str,
        data: dict[str, Any] | None = None,
        links: list[tuple[str, str]] | None = None,
    ) -> None:
        """The answer to a finished action: JSON on the API; otherwise 303 See Other to the
        page the form came from (its ``back`` field) or ``back``, with ``message`` (and
        ``links`` to the records it names) shown once there, so reloading that page never
        repeats the action."""
        admin.forget_status()
        if self.json_api:
            self.send_json({"ok": True, "message": message, **(data or {})})
            return
        errors = (data or {}).get("errors") or {}
        if errors:
            listed = "; ".join(f"{key}: {value}" for key, value in list(errors.items())[:5])
            message += f" Errors: {listed}" + (" ..." if len(errors) > 5 else "")
        self.response.set_cookie(
            FLASH_COOKIE,
            _sealed_flash(message[:_FLASH_CHARS], (links or [])[:3]),
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=self.request.scheme == "https",
        )
        self.response.status_int = 303
        self.response.headers["Location"] = _safe_back(self.field("back"), back)

    def needs_confirmation(
        self, question: str, cancel: str, button: str, *, danger: bool = False, **fields: Any
    ) -> bool:
        """For HTML forms without confirm=yes in the body, render the confirmation page (it
        posts back here with the same fields) and say so. ``button`` names the verb and the
        count ("Retry 3 dead failures"); ``danger`` (deletes, purges) draws it red."""
        if self.json_api or self.field("confirm") == "yes":
            return False
        self.ask(question, cancel, button, danger=danger, **fields)
        return True

    def ask(
        self, question: str, cancel: str, button: str, *, danger: bool = False, **fields: Any
    ) -> None:
        """Render the confirmation page: it posts back here with ``fields`` and confirm=yes."""
        hidden = [(name, value) for name, value in fields.items() if not isinstance(value, list)]
        hidden += [
            (name, item)
            for name, value in fields.items()
            if isinstance(value, list)
            for item in value
        ]
        back = self.field("back")
        if back:
            hidden.append(("back", back))
        self.render(
            "confirm.html",
            title="Confirm",
            question=question,
            button=button,
            danger=danger,
            action=quote(self.path),
            hidden=hidden,
            cancel=_safe_back(back, cancel),
        )

    @property
    def actor(self) -> str:
        return self.admin_user.actor if self.admin_user else "unknown"


def _api(handler: type[_Base]) -> type[_Base]:
    """The JSON twin of a handler class."""
    return type(f"{handler.__name__}Api", (handler,), {"json_api": True})


def _count(number: int | str, noun: str) -> str:
    """``1 failure``, ``3 failures``, ``1000+ failures``."""
    return f"{number} {noun}" + ("" if str(number) == "1" else "s")


def _bulk_summary(action: str, result: admin.BulkResult, what: str) -> str:
    return f"{action.capitalize()} {what}: {result.summary}."


# -- overview -------------------------------------------------------------------------


class OverviewPage(_Base):
    def get(self) -> None:
        data = admin.overview_json(admin.overview(), admin.queue_overview())
        self.respond("overview.html", data, title="Overview", refused=refusals.summary())


class RefusedPage(_Base):
    """Refused deliveries (403s of the task handler) per reason, with the latest examples."""

    def get(self) -> None:
        self.respond("refused.html", refusals.summary(), title="Refused deliveries")


# -- spilled payloads -----------------------------------------------------------------


class SpilloverList(_Base):
    def get(self) -> None:
        wanted = admin.SpillFilter.parse(self.request.GET)
        counting = admin.list_total_async(wanted)
        page = admin.list_spillover(wanted, cursor=self.arg("cursor") or None, limit=self.limit())
        total, capped = admin.list_total(counting)
        data = {
            "items": [admin.spillover_json(record) for record in page.items],
            "next_cursor": page.next_cursor,
            "filters": wanted.params(),
            "total": total,
            "total_capped": capped,
        }
        self.respond(
            "spillover.html",
            data,
            title="Spilled payloads",
            wanted=wanted,
            states=list(admin.PayloadState),
            sorts=list(admin.SPILL_SORTS),
        )


class SpilloverDetail(_Base):
    def get(self, payload_id: str) -> None:
        record = admin.get_spillover(admin.id_from_url(payload_id))
        data = admin.spillover_json(record, detail=True)
        self.respond("spillover_detail.html", data, title=f"Spilled payload {data['id']}")


class SpilloverRetrigger(_Base):
    def post(self, payload_id: str) -> None:
        record_id = admin.id_from_url(payload_id)
        name = admin.retrigger_spillover(record_id, self.actor, version=self.field("version"))
        # Back to the list: the task may run and delete this record before the next page loads.
        self.finish(
            f"Retriggered spilled payload {record_id} as task {name}.",
            f"{PREFIX}/spillover",
            {"task_name": name, "id": record_id},
            [
                (
                    f"spilled payload {record_id}",
                    f"{PREFIX}/spillover/{_templates.segment(record_id)}",
                )
            ],
        )


class SpilloverDelete(_Base):
    def post(self, payload_id: str) -> None:
        record = admin.get_spillover(admin.id_from_url(payload_id))
        if self.needs_confirmation(
            f"Delete the spilled payload of {record.function} "
            f"({admin.format_bytes(record.stored_bytes)}) and its queued task?",
            f"{PREFIX}/spillover/{payload_id}",
            "Delete 1 spilled payload",
            danger=True,
        ):
            return
        admin.delete_spillover(record.key.id(), self.actor)
        self.finish(f"Deleted spilled payload {record.key.id()}.", f"{PREFIX}/spillover")


class SpilloverBulk(_Base):
    def post(self) -> None:
        action, ids, version = self.field("action"), self.fields("ids"), self.field("version")
        if not ids:
            raise admin.BadRequest("select at least one record")
        if self.needs_confirmation(
            f"{action.capitalize()} {_count(len(ids), 'spilled payload')}?",
            f"{PREFIX}/spillover",
            f"{action.capitalize()} {_count(len(ids), 'spilled payload')}",
            danger=action == "delete",
            action=action,
            ids=ids,
            version=version,
        ):
            return
        result = admin.bulk_spillover(action, ids, self.actor, version=version)
        self.finish(
            _bulk_summary(action, result, "spilled payloads"),
            f"{PREFIX}/spillover",
            {"done": result.done, "errors": result.errors},
        )


class _BulkMatching(_Base):
    """An action on every record a filter matches: the count is confirmed first (HTML)."""

    filter_type: ClassVar[type[admin.FailureFilter] | type[admin.SpillFilter]]
    list_path: ClassVar[str]
    apply: ClassVar[Any]

    def post(self) -> None:
        """HTML: the confirmation page carries the count it showed (``expected``), and the
        action runs only while exactly that many records match, on the ids read then; a
        different count asks again. The API acts on what matches, or with ``expected`` in
        its body only on exactly that many (409 otherwise)."""
        wanted = self.filter_type.parse(self.posted())
        action, version = self.field("action"), self.field("version")
        back = f"{PREFIX}{self.list_path}" + _templates.query(wanted.params())
        expected = self._expected()
        if not self.json_api and (self.field("confirm") != "yes" or expected is None):
            self._ask_count(action, version, wanted, back, admin.count_matching(wanted))
            return
        try:
            result = type(self).apply(
                action, wanted, self.actor, version=version, expected=expected
            )
        except admin.CountChanged as exc:
            if self.json_api:
                raise
            self._ask_count(action, version, wanted, back, exc.count, changed=exc.expected)
            return
        self.finish(
            _bulk_summary(action, result, wanted.describe()),
            back,
            {"done": result.done, "errors": result.errors},
        )

    def _expected(self) -> int | None:
        """The confirmed count (field ``expected``), None when absent."""
        value = self.field("expected")
        if not value:
            return None
        if not (value.isascii() and value.isdigit() and len(value) <= 5):
            raise admin.BadRequest(f"expected must be a number of records, not {value[:20]!r}")
        return int(value)

    def _ask_count(
        self,
        action: str,
        version: str,
        wanted: admin.FailureFilter | admin.SpillFilter,
        back: str,
        count: int,
        changed: int | None = None,
    ) -> None:
        shown = f"{count}{'+' if count >= admin.MAX_MATCHING else ''}"
        state = "" if wanted.state == "all" else f"{wanted.state} "
        noun = "failure" if isinstance(wanted, admin.FailureFilter) else "spilled payload"
        note = (
            f"The number of matching records changed from {changed} to {count}: nothing was "
            "done yet. "
            if changed is not None
            else ""
        )
        self.ask(
            f"{note}{action.capitalize()} {shown} {wanted.describe()}? At most "
            f"{admin.MAX_MATCHING:,} are done, {admin.MAX_BULK} at a time.",
            back,
            f"{action.capitalize()} {_count(shown, state + noun)}",
            danger=action == "delete",
            action=action,
            version=version,
            expected=str(count),
            **wanted.params(),
        )


class SpilloverBulkMatching(_BulkMatching):
    """Retrigger or delete every spilled payload a filter matches."""

    filter_type = admin.SpillFilter
    list_path = "/spillover"
    apply = staticmethod(admin.bulk_spillover_matching)


# -- failures -------------------------------------------------------------------------


class FailureGroups(_Base):
    def get(self) -> None:
        view = self.arg("view") or "active"
        page = admin.failure_groups(view, cursor=self.arg("cursor") or None)
        data = {
            "items": [admin.group_json(group) for group in page.items],
            "next_cursor": page.next_cursor,
            "count_cap": admin.GROUP_COUNT_CAP,
        }
        self.respond("failures.html", data, title="Failures", view=view, views=admin.FAILURE_VIEWS)


class FailureList(_Base):
    def get(self) -> None:
        wanted = admin.FailureFilter.parse(self.request.GET)
        counting = admin.list_total_async(wanted)
        page = admin.list_failures(wanted, cursor=self.arg("cursor") or None, limit=self.limit())
        total, capped = admin.list_total(counting)
        estimates = admin.estimated_next_attempts(page.items)
        data = {
            "items": [
                {**admin.failure_json(record), "next_attempt_estimate": estimates.get(record.id)}
                for record in page.items
            ],
            "next_cursor": page.next_cursor,
            "filters": wanted.params(),
            "total": total,
            "total_capped": capped,
        }
        self.respond(
            "failure_list.html",
            data,
            title=_group_title(wanted.group),
            wanted=wanted,
            states=("all", *admin.FAILURE_VIEWS),
            sorts=list(admin.FAILURE_SORTS),
        )


def _group_title(group: str | None) -> str:
    if not group:
        return "Failures"
    function, _, exception_type = group.rpartition("|")
    return f"{function} raised {exception_type.rsplit('.', 1)[-1]}"


class FailureDetail(_Base):
    def get(self, failure_id: str) -> None:
        record = admin.get_failure(admin.id_from_url(failure_id))
        data = {
            **admin.failure_json(record, detail=True),
            "next_attempt": admin.next_attempt(record),
        }
        self.respond("failure_detail.html", data, title=f"Failure {data['id']}", failure=data)


class FailureRetrigger(_Base):
    def post(self, failure_id: str) -> None:
        record_id = admin.id_from_url(failure_id)
        name = admin.retrigger_failure(record_id, self.actor, version=self.field("version"))
        self.finish(
            f"Retrying failure {record_id} as task {name}.",
            f"{PREFIX}/failures/{failure_id}",
            {"task_name": name, "id": record_id},
            [(f"failure {record_id}", f"{PREFIX}/failures/{_templates.segment(record_id)}")],
        )


class FailureDismiss(_Base):
    def post(self, failure_id: str) -> None:
        record_id = admin.id_from_url(failure_id)
        admin.dismiss_failure(record_id, self.actor)
        self.finish(
            f"Dismissed failure {record_id}.",
            f"{PREFIX}/failures/{failure_id}",
            links=[(f"failure {record_id}", f"{PREFIX}/failures/{_templates.segment(record_id)}")],
        )


class FailureDelete(_Base):
    def post(self, failure_id: str) -> None:
        record = admin.get_failure(admin.id_from_url(failure_id))
        if self.needs_confirmation(
            f"Delete the failure record of {record.function} and its kept payload?",
            f"{PREFIX}/failures/{failure_id}",
            "Delete 1 failure",
            danger=True,
        ):
            return
        admin.delete_failure(record.key.id(), self.actor)
        self.finish(f"Deleted failure {record.key.id()}.", f"{PREFIX}/failures/list")


class FailureBulk(_Base):
    def post(self) -> None:
        action, ids, version = self.field("action"), self.fields("ids"), self.field("version")
        if not ids:
            raise admin.BadRequest("select at least one failure")
        if self.needs_confirmation(
            f"{action.capitalize()} {_count(len(ids), 'failure')}?",
            f"{PREFIX}/failures/list",
            f"{action.capitalize()} {_count(len(ids), 'failure')}",
            danger=action == "delete",
            action=action,
            ids=ids,
            version=version,
        ):
            return
        result = admin.bulk_failures(action, ids, self.actor, version=version)
        self.finish(
            _bulk_summary(action, result, "failures"),
            f"{PREFIX}/failures/list",
            {"done": result.done, "errors": result.errors},
        )


class FailureBulkMatching(_BulkMatching):
    """Retrigger, dismiss or delete every failure a filter matches."""

    filter_type = admin.FailureFilter
    list_path = "/failures/list"
    apply = staticmethod(admin.bulk_failures_matching)


class FailureRetryGroup(_Base):
    """Retry a group's failures in the view its button was on: from the dead tab only the dead
    ones ("active", the default, is every retriable state)."""

    def post(self) -> None:
        group, view = self.field("group"), self.field("view") or "active"
        states = admin.retriable_states(view)
        if not self.json_api:
            count = admin.count_group(group, states)
            shown = f"{count}{'+' if count >= admin.MAX_BULK else ''}"
            noun = "failure" if view == "active" else f"{view} failure"
            if self.needs_confirmation(
                f"Retry {_count(shown, noun)} where {_group_title(group)}? "
                f"At most {admin.MAX_BULK} are retried, newest first.",
                f"{PREFIX}/failures?view={view}",
                f"Retry {_count(shown, noun)}",
                group=group,
                view=view,
            ):
                return
        result = admin.retry_group(group, self.actor, states=states)
        self.finish(
            f"Retried {_count(len(result.done), 'failure')} where {_group_title(group)}; "
            f"{len(result.errors)} could not be retried.",
            f"{PREFIX}/failures?view={view}",
            {"done": result.done, "errors": result.errors},
        )


# -- queues and tasks -----------------------------------------------------------------


class QueueList(_Base):
    def get(self) -> None:
        queues = [admin.queue_json(queue) for queue in admin.queue_overview()]
        self.respond("queues.html", {"items": queues}, title="Queues")


class QueueTasks(_Base):
    def get(self, queue: str) -> None:
        name = admin.id_from_url(queue)
        info = admin.get_queue(name)
        page = admin.list_tasks(name, page_token=self.arg("cursor") or None, limit=self.limit())
        data = {
            "queue": name,
            "state": info.state.name,
            "items": [admin.task_json(task) for task in page.items],
            "next_cursor": page.next_cursor,
        }
        self.respond("queue_tasks.html", data, title=f"Queue {name}")


class TaskDetail(_Base):
    def get(self, queue: str, task: str) -> None:
        data = admin.task_detail(admin.id_from_url(queue), admin.id_from_url(task))
        self.respond("task_detail.html", data, title=f"Task {data['name']}")


class _QueueAction(_Base):
    verb: ClassVar[str] = ""
    question: ClassVar[str | None] = None

    def post(self, queue: str) -> None:
        name = admin.check_queue_name(admin.id_from_url(queue))
        back = f"{PREFIX}/queues/{queue}"
        if self.question and self.needs_confirmation(
            self.question.format(queue=name), back, f"Purge queue {name}", danger=True
        ):
            return
        getattr(admin, f"{self.verb}_queue")(name, self.actor)
        self.finish(f"Queue {name}: {self.verb} done.", back)


class QueuePause(_QueueAction):
    verb = "pause"


class QueueResume(_QueueAction):
    verb = "resume"


class QueuePurge(_QueueAction):
    verb = "purge"
    question = "Purge queue {queue}? Every task waiting in it is deleted."


class TaskRun(_Base):
    def post(self, queue: str, task: str) -> None:
        name = admin.id_from_url(task)
        admin.run_task(admin.id_from_url(queue), name, self.actor)
        self.finish(
            f"Task {name} dispatched now.",
            f"{PREFIX}/queues/{queue}",
            links=[(f"queue {admin.id_from_url(queue)}", f"{PREFIX}/queues/{queue}")],
        )


class TaskDelete(_Base):
    def post(self, queue: str, task: str) -> None:
        queue_name, name = admin.id_from_url(queue), admin.id_from_url(task)
        back = f"{PREFIX}/queues/{queue}"
        if self.needs_confirmation(
            f"Delete task {name} from {queue_name}?", back, "Delete 1 task", danger=True
        ):
            return
        admin.delete_task(queue_name, name, self.actor)
        self.finish(f"Task {name} deleted.", back)


# -- metrics --------------------------------------------------------------------------


class MetricsPage(_Base):
    """Functions sorted by runs, failures or p95 in a window; ``function=`` shows one."""

    def get(self) -> None:
        window, sort = self.arg("window") or "24h", self.arg("sort") or "runs"
        function = self.arg("function")
        if function:
            data = admin.function_metrics(function, window)
            self.respond("metrics_function.html", data, title=f"Metrics of {function}")
            return
        page = admin.list_metrics(
            window, sort, cursor=self.arg("cursor") or None, limit=self.limit()
        )
        self.respond(
            "metrics.html",
            page,
            title="Metrics",
            windows=list(metrics.WINDOWS),
            sorts=metrics.SORTS,
        )


# -- iterate() jobs -------------------------------------------------------------------


class JobList(_Base):
    def get(self) -> None:
        page = admin.list_jobs(cursor=self.arg("cursor") or None, limit=self.limit())
        live = [job for job in page.items if job.state not in ("done", "cancelled")]
        shards = admin.shards_of(live)
        data = {
            "items": [admin.job_json(job, shards.get(job.id)) for job in page.items],
            "next_cursor": page.next_cursor,
        }
        self.respond("jobs.html", data, title="Jobs", duration=admin.format_duration)


class JobDetail(_Base):
    def get(self, job_id: str) -> None:
        data = admin.job_detail(admin.id_from_url(job_id))
        self.respond(
            "job_detail.html", data, title=f"Job {data['name']}", duration=admin.format_duration
        )


class _JobAction(_Base):
    verb: ClassVar[str] = ""
    question: ClassVar[str | None] = None

    def post(self, job_id: str) -> None:
        record_id = admin.id_from_url(job_id)
        back = f"{PREFIX}/jobs/{job_id}"
        if self.question and self.needs_confirmation(
            self.question.format(job=record_id), back, f"Cancel job {record_id}", danger=True
        ):
            return
        job = getattr(admin, f"{self.verb}_job")(record_id, self.actor)
        self.finish(f"Job {job.name}: {self.verb} done.", back, {"state": job.state})


class JobPause(_JobAction):
    verb = "pause"


class JobResume(_JobAction):
    verb = "resume"


class JobCancel(_JobAction):
    verb = "cancel"
    question = "Cancel job {job}? Its shards stop after their current batch; finalize never runs."


class StatusApi(_Base):
    """``GET api/status``: the status strip's numbers (what every page shows at its top)."""

    json_api = True

    def get(self) -> None:
        self.send_json(admin.status_strip())


class MetricsProm(_Base):
    """``GET metrics.prom``: OpenMetrics text for Prometheus (any dashboard user, or a scraper
    with the bearer token of ``_scrape_auth``); ``?window=1h|24h|7d``."""

    def _authenticate(self) -> _admin_auth.Admin | None:
        return _scrape_auth.scraper(self.request.environ) or super()._authenticate()

    def get(self) -> None:
        window = self.arg("window") or "1h"
        if window not in metrics.WINDOWS:
            raise admin.BadRequest(f"window must be one of {', '.join(metrics.WINDOWS)}")
        self.response.headers["Content-Type"] = admin.OPENMETRICS_CONTENT_TYPE
        self.response.write(admin.openmetrics_text(window))


# -- audit, sweeper, csrf, static -----------------------------------------------------


class AuditPage(_Base):
    def get(self) -> None:
        page = admin.list_audit(cursor=self.arg("cursor") or None, limit=self.limit())
        total, capped = admin.audit_total()
        data = {
            "items": [admin.audit_json(entry) for entry in page.items],
            "next_cursor": page.next_cursor,
            "total": total,
            "total_capped": capped,
        }
        self.respond("audit.html", data, title="Audit log")


class SweepNow(_Base):
    def post(self) -> None:
        report = admin.run_sweeper(self.actor)
        summary = ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in report.items())
        self.finish(f"Sweeper ran. {summary}", PREFIX, {"report": report})


class CronSweep(_Base):
    """GET by App Engine cron, or with the local stack's cron token: runs the sweeper once.

    Nothing else may: a GET never changes state for a person, even an admin on loopback.
    """

    json_api = True

    def _authenticate(self) -> _admin_auth.Admin | None:
        return _admin_auth.cron_caller(self.request.environ)

    def _denial(self) -> str:
        return (
            "Cron only (App Engine's X-Appengine-Cron, or X-Deferred-Cron-Token): "
            f"admins run the sweeper with POST {PREFIX}/sweep."
        )

    def get(self) -> None:
        self.send_json({"ok": True, "report": admin.run_sweeper(self.actor, audit_idle=False)})


class CsrfToken(_Base):
    """GET /api/csrf: the token for API scripts (the cookie comes with the response)."""

    json_api = True

    def get(self) -> None:
        self.send_json({"csrf_token": self.csrf_token, "header": _admin_csrf.HEADER})


class NotFoundPage(_Base):
    def get(self, rest: str = "") -> None:
        self.fail(404, "No such page.")

    post = get


class StaticFile(webapp2.RequestHandler):
    """The dashboard's CSS/SVG, for stacks without app.yaml's static_dir (no secrets here).

    Cacheable for five minutes: the only responses without ``Cache-Control: no-store``.
    """

    def dispatch(self) -> None:
        self.response.headers.update(SECURITY_HEADERS)
        refused = guard.refusal(self.request.environ)
        if refused is not None:
            self.response.status_int, message = refused
            self.response.content_type = "text/plain"
            self.response.write(message + "\n")
            return
        super().dispatch()

    def get(self, name: str) -> None:
        path = os.path.join(_templates.STATIC_DIR, name)
        if not _STATIC_NAME.match(name) or not os.path.isfile(path):
            self.response.status_int = 404
            self.response.content_type = "text/plain"
            self.response.write("not found\n")
            return
        with open(path, "rb") as static:
            self.response.body = static.read()
        self.response.content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self.response.headers["Cache-Control"] = "public, max-age=300"


class _Route(webapp2.BaseRoute):
    """One dashboard page: a pattern under the prefix and its handler (matched by _Dashboard)."""

    def __init__(self, pattern: str, handler: type[webapp2.RequestHandler]) -> None:
        super().__init__(PREFIX + pattern, handler=handler)
        self.regex = re.compile("^" + re.escape(PREFIX) + pattern + "$")


class _Dashboard(webapp2.BaseRoute):
    """Every dashboard route as one webapp2 route, so routing costs a task request one prefix
    check. The path is decoded once, as the server decoded it: a path that is not UTF-8 matches
    no page but the catch-all (which answers 400), and ``%25`` is never decoded twice
    (webapp2.Route unquotes the decoded path again). Anything else under the prefix is a 404.
    """

    def __init__(self, routes: list[_Route]) -> None:
        super().__init__(PREFIX + "/*", handler=NotFoundPage)
        self.routes = routes

    def match(self, request: webapp2.Request) -> tuple[Any, tuple, dict[str, str]] | None:
        environ = request.environ
        if not guard.is_dashboard(environ):
            return None
        path = guard.request_path(environ)
        if path is not None:
            for route in self.routes:
                found = route.regex.match(path)
                if found:
                    return route, (), found.groupdict()
        return self, (), {}


_SEGMENT = r"[^/]+"


def _id(name: str) -> str:
    return f"(?P<{name}>{_SEGMENT})"


def admin_routes() -> list[webapp2.BaseRoute]:
    """The dashboard as one route: HTML under /_ah/deferred-admin, JSON under .../api/."""
    payload, failure = _id("payload_id"), _id("failure_id")
    queue, task = _id("queue"), _id("task")
    job = _id("job_id")
    pages: list[tuple[str, type[_Base]]] = [
        ("", OverviewPage),
        ("/spillover", SpilloverList),
        ("/spillover/bulk", SpilloverBulk),
        ("/spillover/bulk-matching", SpilloverBulkMatching),
        (f"/spillover/{payload}", SpilloverDetail),
        (f"/spillover/{payload}/retrigger", SpilloverRetrigger),
        (f"/spillover/{payload}/delete", SpilloverDelete),
        ("/failures", FailureGroups),
        ("/failures/groups", FailureGroups),
        ("/failures/list", FailureList),
        ("/failures/bulk", FailureBulk),
        ("/failures/bulk-matching", FailureBulkMatching),
        ("/failures/retry-group", FailureRetryGroup),
        (f"/failures/{failure}", FailureDetail),
        (f"/failures/{failure}/retrigger", FailureRetrigger),
        (f"/failures/{failure}/dismiss", FailureDismiss),
        (f"/failures/{failure}/delete", FailureDelete),
        ("/queues", QueueList),
        (f"/queues/{queue}", QueueTasks),
        (f"/queues/{queue}/tasks", QueueTasks),
        (f"/queues/{queue}/pause", QueuePause),
        (f"/queues/{queue}/resume", QueueResume),
        (f"/queues/{queue}/purge", QueuePurge),
        (f"/queues/{queue}/tasks/{task}", TaskDetail),
        (f"/queues/{queue}/tasks/{task}/run", TaskRun),
        (f"/queues/{queue}/tasks/{task}/delete", TaskDelete),
        ("/metrics", MetricsPage),
        ("/jobs", JobList),
        (f"/jobs/{job}", JobDetail),
        (f"/jobs/{job}/pause", JobPause),
        (f"/jobs/{job}/resume", JobResume),
        (f"/jobs/{job}/cancel", JobCancel),
        ("/audit", AuditPage),
        ("/refused", RefusedPage),
        ("/sweep", SweepNow),
    ]
    routes: list[webapp2.BaseRoute] = [_Route("/", OverviewPage)]
    # docs/design.md: GET api/failures lists failures; the HTML page of that path shows groups.
    routes.append(_Route("/api/failures", _api(FailureList)))
    for path, handler in pages:
        routes.append(_Route(path, handler))
        routes.append(_Route(f"/api{path or '/overview'}", _api(handler)))
    routes += [
        _Route(r"/metrics\.prom", MetricsProm),
        _Route("/api/csrf", CsrfToken),
        _Route("/api/status", StatusApi),
        _Route("/cron/sweep", CronSweep),
        _Route(f"/static/(?P<name>{_SEGMENT})", StaticFile),
    ]
    return [_Dashboard(routes)]
