"""The base of every dashboard handler: request parsing, auth and CSRF hooks, answers.

Handlers only parse the request, call :mod:`gae_deferred.admin` (which also shapes every
record as JSON) and answer with :meth:`AdminHandler.respond` (a page, or the same data as JSON
under ``/_ah/deferred-admin/api/``) or :meth:`AdminHandler.finish` (an action: JSON, or
``303 See Other`` back to the page with a one-time message). Every request is authenticated
(``_admin_auth``; default deny), every POST is CSRF-checked (``_admin_csrf``) and reads its
parameters from the body only, and every response carries the security headers of
``_admin_guard``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

import webapp2

from gae_deferred import Error, admin, audit, ndb_context

from .. import _admin_auth, _admin_csrf, _admin_guard as guard, _templates

logger = logging.getLogger("gae_deferred.admin")

PREFIX = guard.PREFIX
SECURITY_HEADERS = guard.SECURITY_HEADERS
FLASH_COOKIE = "deferred_admin_flash"
REFRESH_COOKIE = "deferred_admin_refresh"
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


class AdminHandler(webapp2.RequestHandler):
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


def api_twin(handler: type[AdminHandler]) -> type[AdminHandler]:
    """The JSON twin of a handler class."""
    return type(f"{handler.__name__}Api", (handler,), {"json_api": True})


def plural(number: int | str, noun: str) -> str:
    """``1 failure``, ``3 failures``, ``1000+ failures``."""
    return f"{number} {noun}" + ("" if str(number) == "1" else "s")


def bulk_summary(action: str, result: admin.BulkResult, what: str) -> str:
    return f"{action.capitalize()} {what}: {result.summary}."
