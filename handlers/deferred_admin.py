"""/_ah/deferred-admin: the dashboard's HTML pages, actions and JSON API (webapp2).

Handlers only parse the request, call :mod:`gae_deferred.admin` and render one template (or
JSON under ``/_ah/deferred-admin/api/``). Every request is authenticated (see
``_admin_auth``; default deny), every POST is CSRF-checked (see ``_admin_csrf``) and every
response carries the security headers below. Pages work without JavaScript: confirmations
are server-rendered forms, "expand" is ``<details>``, auto-refresh is a meta refresh::

    app = webapp2.WSGIApplication(MY_ROUTES + deferred_routes())   # includes admin_routes()
"""

from __future__ import annotations

import datetime
import json
import logging
import mimetypes
import os
import re
from typing import Any, ClassVar
from urllib.parse import urlencode

import jinja2
import webapp2

from gae_deferred import Error, admin, ndb_context

from . import _admin_auth, _admin_csrf

logger = logging.getLogger("gae_deferred.admin")

PREFIX = "/_ah/deferred-admin"


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
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(css|svg|js|png|ico)$")
_REFRESH_CHOICES = (0, 10, 30, 60)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _age(value: datetime.datetime | float | None) -> str:
    """'3d 4h', '5m 2s' ... for a datetime in the past or a number of seconds."""
    if value is None:
        return "-"
    if isinstance(value, datetime.datetime):
        value = (datetime.datetime.now(datetime.UTC) - value).total_seconds()
    seconds = max(0, int(value))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} {seconds % size // sub_size}{sub}"
    return f"{seconds // 60}m {seconds % 60}s" if seconds >= 60 else f"{seconds}s"


def _timestamp(value: datetime.datetime | str | None) -> str:
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


def _retry(policy: dict[str, Any]) -> str:
    """'6 attempts, backoff 1s-60s (4 doublings), for at most 1d' from a queue's retry dict."""
    if not policy:
        return "-"
    attempts = policy.get("max_attempts")
    parts = ["unlimited attempts" if attempts in (None, -1) else f"{attempts} attempts"]
    parts.append(
        f"backoff {_duration(policy.get('min_backoff'))}-{_duration(policy.get('max_backoff'))}"
        f" ({policy.get('max_doublings')} doublings)"
    )
    if policy.get("max_retry_duration"):
        parts.append(f"for at most {_duration(policy['max_retry_duration'])}")
    return ", ".join(parts)


_jinja = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_jinja.filters.update(age=_age, bytes=admin.format_bytes, ts=_timestamp, retry=_retry)
_jinja.globals.update(prefix=PREFIX, refresh_choices=_REFRESH_CHOICES)


class _Base(webapp2.RequestHandler):
    """Auth, CSRF, security headers, an ndb context and error pages for every admin request."""

    #: True on the /api/ twin of a handler: JSON in and out, no confirmation pages.
    json_api: ClassVar[bool] = False
    admin_user: _admin_auth.Admin | None = None
    csrf_token = ""

    def dispatch(self) -> None:
        self.response.headers.update(SECURITY_HEADERS)
        try:
            self.request.params  # noqa: B018 - parse query string and form once, here
        except UnicodeDecodeError:
            # The error page reads the query string too: drop what cannot be decoded.
            self.request.environ["QUERY_STRING"] = ""
            self.fail(400, "The query string or form is not valid UTF-8.")
            return
        self.admin_user = self._authenticate()
        if self.admin_user is None:
            self.fail(403, "Admins only: this dashboard needs an administrator login.")
            return
        secret, fresh = _admin_csrf.cookie_secret(self.request)
        if fresh:
            _admin_csrf.set_cookie(self.response, self.request, secret)
        self.csrf_token = _admin_csrf.token_for(secret)
        if self.request.method == "POST" and not _admin_csrf.valid(self.request):
            self.fail(403, "CSRF token missing or wrong: reload the page and try again.")
            return
        if getattr(self, self.request.method.lower(), None) is None:
            self.fail(405, f"{self.request.method} is not allowed here.")
            return
        with ndb_context():
            super().dispatch()

    def _authenticate(self) -> _admin_auth.Admin | None:
        return _admin_auth.authenticate(self.request.environ)

    def handle_exception(self, exception: BaseException, debug: bool) -> None:
        if isinstance(exception, admin.AdminError):
            self.fail(exception.status, str(exception))
        elif isinstance(exception, Error):
            self.fail(400, str(exception))
        else:
            logger.exception("dashboard error on %s", self.request.path)
            self.fail(500, "Something went wrong; the details are in the server log.")

    # -- request helpers --------------------------------------------------------------

    def param(self, name: str, default: str = "") -> str:
        body = self._json_body()
        if name in body:
            return str(body[name])
        return self.request.params.get(name, default)

    def params(self, name: str) -> list[str]:
        body = self._json_body()
        if name in body:
            values = body[name]
            if not isinstance(values, list):
                raise admin.BadRequest(f"{name} must be a list")
            return [str(value) for value in values]
        return self.request.params.getall(name)

    def _json_body(self) -> dict[str, Any]:
        if self.request.method != "POST" or self.request.content_type != "application/json":
            return {}
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError as exc:
            raise admin.BadRequest("the request body is not valid JSON") from exc
        if not isinstance(body, dict):
            raise admin.BadRequest("the request body must be a JSON object")
        return body

    def limit(self) -> int:
        return admin.page_size(self.request.GET.get("limit"))

    # -- responses --------------------------------------------------------------------

    def render(self, template: str, status: int = 200, **context: Any) -> None:
        refresh = self.request.GET.get("refresh", "0")
        context.setdefault("title", "Deferred tasks")
        context.update(
            admin_user=self.admin_user,
            local_mode=bool(self.admin_user and self.admin_user.local_mode),
            csrf_token=self.csrf_token,
            refresh=int(refresh) if refresh in {str(c) for c in _REFRESH_CHOICES} else 0,
            page_url=self._url_with,
            request_path=self.request.path,
        )
        self.response.status_int = status
        self.response.content_type = "text/html"
        self.response.charset = "utf-8"
        self.response.write(_jinja.get_template(f"deferred_admin/{template}").render(context))

    def _url_with(self, **changes: Any) -> str:
        """This page's URL with some query parameters changed (None removes one)."""
        query = {key: value for key, value in self.request.GET.items() if key not in changes}
        query.update({key: value for key, value in changes.items() if value not in (None, "")})
        return self.request.path + ("?" + urlencode(query) if query else "")

    def send_json(self, data: Any, status: int = 200) -> None:
        self.response.status_int = status
        self.response.content_type = "application/json"
        self.response.charset = "utf-8"
        self.response.write(json.dumps(data, default=str))

    def fail(self, status: int, message: str) -> None:
        self.response.clear()
        self.response.headers.update(SECURITY_HEADERS)
        if self.json_api or self.request.path.startswith(f"{PREFIX}/api/"):
            self.send_json({"error": message, "status": status}, status)
            return
        self.render("error.html", status=status, title=f"Error {status}", message=message)

    def done(self, message: str, back: str, data: dict[str, Any] | None = None) -> None:
        """The answer to a finished action: JSON for the API, a result page otherwise."""
        if self.json_api:
            self.send_json({"ok": True, "message": message, **(data or {})})
            return
        errors = (data or {}).get("errors")
        self.render(
            "done.html",
            title="Done",
            message=message,
            back=back,
            errors=errors if isinstance(errors, dict) else {},
        )

    def needs_confirmation(self, question: str, cancel: str, **fields: Any) -> bool:
        """For HTML forms without confirm=yes, render the confirmation page and say so."""
        if self.json_api or self.param("confirm") == "yes":
            return False
        hidden = [(name, value) for name, value in fields.items() if not isinstance(value, list)]
        hidden += [
            (name, item)
            for name, value in fields.items()
            if isinstance(value, list)
            for item in value
        ]
        self.render(
            "confirm.html",
            title="Confirm",
            question=question,
            action=self.request.path,
            hidden=hidden,
            cancel=cancel,
        )
        return True

    @property
    def actor(self) -> str:
        return self.admin_user.actor if self.admin_user else "unknown"


def _api(handler: type[_Base]) -> type[_Base]:
    """The JSON twin of a handler class."""
    return type(f"{handler.__name__}Api", (handler,), {"json_api": True})


# -- overview -------------------------------------------------------------------------


class OverviewPage(_Base):
    def get(self) -> None:
        numbers = admin.overview()
        queues = admin.queue_overview()
        if self.json_api:
            self.send_json({**numbers.to_json(), "queues": [q.to_json() for q in queues]})
            return
        self.render(
            "overview.html",
            title="Overview",
            numbers=numbers,
            queues=queues,
            failure_rows=[(hour.strftime("%H:00"), n) for hour, n in numbers.failures_by_hour],
        )


# -- spilled payloads -----------------------------------------------------------------


class SpilloverList(_Base):
    def get(self) -> None:
        filters = {
            "state": self.request.GET.get("state") or "pending",
            "function": self.request.GET.get("function") or None,
            "queue": self.request.GET.get("queue") or None,
            "sort": self.request.GET.get("sort") or "oldest",
        }
        page = admin.list_spillover(
            **filters, cursor=self.request.GET.get("cursor"), limit=self.limit()
        )
        if self.json_api:
            self.send_json(
                {
                    "items": [admin.spillover_json(r) for r in page.items],
                    "next_cursor": page.next_cursor,
                }
            )
            return
        self.render(
            "spillover.html",
            title="Spilled payloads",
            page=page,
            filters=filters,
            states=list(admin.PayloadState),
            sorts=list(admin.SPILL_SORTS),
        )


class SpilloverDetail(_Base):
    def get(self, payload_id: str) -> None:
        record = admin.get_spillover(payload_id)
        if self.json_api:
            self.send_json({**admin.spillover_json(record), "meta": record.meta or {}})
            return
        self.render(
            "spillover_detail.html",
            title=f"Spilled payload {payload_id}",
            record=record,
            meta=sorted((record.meta or {}).items()),
        )


class SpilloverRetrigger(_Base):
    def post(self, payload_id: str) -> None:
        name = admin.retrigger_spillover(
            payload_id, self.actor, version=self.param("version") or None
        )
        self.done(
            f"Retriggered spilled payload {payload_id} as task {name}.",
            f"{PREFIX}/spillover",
            {"task_name": name, "id": payload_id},
        )


class SpilloverDelete(_Base):
    def post(self, payload_id: str) -> None:
        record = admin.get_spillover(payload_id)
        if self.needs_confirmation(
            f"Delete the spilled payload of {record.function} "
            f"({admin.format_bytes(record.stored_bytes)}) and its queued task?",
            f"{PREFIX}/spillover/{payload_id}",
        ):
            return
        admin.delete_spillover(payload_id, self.actor)
        self.done(f"Deleted spilled payload {payload_id}.", f"{PREFIX}/spillover")


class SpilloverBulk(_Base):
    def post(self) -> None:
        action, ids = self.param("action"), self.params("ids")
        version = self.param("version") or None
        if not ids:
            raise admin.BadRequest("select at least one record")
        if self.needs_confirmation(
            f"{action.capitalize()} {len(ids)} spilled payload(s)?",
            f"{PREFIX}/spillover",
            action=action,
            ids=ids,
            version=version or "",
        ):
            return
        result = admin.bulk_spillover(action, ids, self.actor, version=version)
        self.done(
            f"{action.capitalize()}: {len(result.done)} done, {len(result.errors)} failed.",
            f"{PREFIX}/spillover",
            {"done": result.done, "errors": result.errors},
        )


# -- failures -------------------------------------------------------------------------


class FailureGroups(_Base):
    def get(self) -> None:
        view = self.request.GET.get("view") or "active"
        page = admin.failure_groups(view, cursor=self.request.GET.get("cursor"))
        if self.json_api:
            self.send_json(
                {
                    "items": [
                        {
                            "group": g.group,
                            "function": g.function,
                            "exception_type": g.exception_type,
                            "count": g.count,
                            "last_seen": g.last_seen.isoformat(),
                            "partial": g.partial,
                        }
                        for g in page.items
                    ],
                    "next_cursor": page.next_cursor,
                    "count_cap": admin.GROUP_COUNT_CAP,
                }
            )
            return
        self.render(
            "failures.html",
            title="Failures",
            page=page,
            view=view,
            views=admin.FAILURE_VIEWS,
            count_cap=admin.GROUP_COUNT_CAP,
        )


class FailureList(_Base):
    def get(self) -> None:
        state = self.request.GET.get("state") or None
        group = self.request.GET.get("group") or None
        page = admin.list_failures(
            state=state, group=group, cursor=self.request.GET.get("cursor"), limit=self.limit()
        )
        if self.json_api:
            self.send_json(
                {
                    "items": [admin.failure_json(r) for r in page.items],
                    "next_cursor": page.next_cursor,
                }
            )
            return
        self.render(
            "failure_list.html",
            title=_group_title(group),
            page=page,
            state=state or "all",
            group=group or "",
            states=("all", *admin.FailureState),
            retriggerable=admin.failures.RETRIGGERABLE,
        )


def _group_title(group: str | None) -> str:
    if not group:
        return "Failures"
    function, _, exception_type = group.rpartition("|")
    return f"{function} raised {exception_type.rsplit('.', 1)[-1]}"


class FailureDetail(_Base):
    def get(self, failure_id: str) -> None:
        record = admin.get_failure(failure_id)
        if self.json_api:
            self.send_json({**admin.failure_json(record), "meta": record.meta or {}})
            return
        self.render(
            "failure_detail.html",
            title=f"Failure {failure_id}",
            record=record,
            meta=sorted((record.meta or {}).items()),
            retriggerable=admin.failures.RETRIGGERABLE,
        )


class FailureRetrigger(_Base):
    def post(self, failure_id: str) -> None:
        name = admin.retrigger_failure(
            failure_id, self.actor, version=self.param("version") or None
        )
        self.done(
            f"Retrying failure {failure_id} as task {name}.",
            f"{PREFIX}/failures/{failure_id}",
            {"task_name": name, "id": failure_id},
        )


class FailureDismiss(_Base):
    def post(self, failure_id: str) -> None:
        admin.dismiss_failure(failure_id, self.actor)
        self.done(f"Dismissed failure {failure_id}.", f"{PREFIX}/failures")


class FailureDelete(_Base):
    def post(self, failure_id: str) -> None:
        record = admin.get_failure(failure_id)
        if self.needs_confirmation(
            f"Delete the failure record of {record.function} and its kept payload?",
            f"{PREFIX}/failures/{failure_id}",
        ):
            return
        admin.delete_failure(failure_id, self.actor)
        self.done(f"Deleted failure {failure_id}.", f"{PREFIX}/failures")


class FailureRetryGroup(_Base):
    def post(self) -> None:
        group = self.param("group")
        if self.needs_confirmation(
            f"Retry up to {admin.MAX_BULK} failures where {_group_title(group)}?",
            f"{PREFIX}/failures",
            group=group,
        ):
            return
        result = admin.retry_group(group, self.actor)
        self.done(
            f"Retried {len(result.done)} failure(s) where {_group_title(group)}; "
            f"{len(result.errors)} could not be retried.",
            f"{PREFIX}/failures",
            {"done": result.done, "errors": result.errors},
        )


class FailureBulk(_Base):
    def post(self) -> None:
        action, ids = self.param("action"), self.params("ids")
        if not ids:
            raise admin.BadRequest("select at least one failure")
        if self.needs_confirmation(
            f"{action.capitalize()} {len(ids)} failure(s)?",
            f"{PREFIX}/failures",
            action=action,
            ids=ids,
        ):
            return
        result = admin.bulk_failures(action, ids, self.actor)
        self.done(
            f"{action.capitalize()}: {len(result.done)} done, {len(result.errors)} failed.",
            f"{PREFIX}/failures",
            {"done": result.done, "errors": result.errors},
        )


# -- queues and tasks -----------------------------------------------------------------


class QueueList(_Base):
    def get(self) -> None:
        queues = admin.queue_overview()
        if self.json_api:
            self.send_json(
                {
                    "items": [
                        {
                            "name": q.name,
                            "state": q.state,
                            "rate": q.rate,
                            "max_concurrent": q.max_concurrent,
                            "retry": q.retry,
                            "tasks": q.tasks,
                            "tasks_capped": q.tasks_capped,
                            "oldest_task_age": q.oldest_task_age,
                            "in_queue_yaml": q.in_queue_yaml,
                            "error": q.error,
                        }
                        for q in queues
                    ]
                }
            )
            return
        self.render("queues.html", title="Queues", queues=queues)


class QueueTasks(_Base):
    def get(self, queue: str) -> None:
        info = admin.get_queue(queue)
        page = admin.list_tasks(
            queue, page_token=self.request.GET.get("cursor"), limit=self.limit()
        )
        tasks = [admin.task_json(task) for task in page.items]
        if self.json_api:
            self.send_json(
                {
                    "queue": queue,
                    "state": info.state.name,
                    "items": tasks,
                    "next_cursor": page.next_cursor,
                }
            )
            return
        self.render(
            "queue_tasks.html",
            title=f"Queue {queue}",
            queue=queue,
            state=info.state.name,
            tasks=tasks,
            next_cursor=page.next_cursor,
        )


class _QueueAction(_Base):
    verb: ClassVar[str] = ""
    question: ClassVar[str | None] = None

    def post(self, queue: str) -> None:
        admin.check_queue_name(queue)
        if self.question and self.needs_confirmation(
            self.question.format(queue=queue), f"{PREFIX}/queues/{queue}"
        ):
            return
        getattr(admin, f"{self.verb}_queue")(queue, self.actor)
        self.done(f"Queue {queue}: {self.verb} done.", f"{PREFIX}/queues/{queue}")


class QueuePause(_QueueAction):
    verb = "pause"


class QueueResume(_QueueAction):
    verb = "resume"


class QueuePurge(_QueueAction):
    verb = "purge"
    question = "Purge queue {queue}? Every task waiting in it is deleted."


class TaskRun(_Base):
    def post(self, queue: str, task: str) -> None:
        admin.run_task(queue, task, self.actor)
        self.done(f"Task {task} dispatched now.", f"{PREFIX}/queues/{queue}")


class TaskDelete(_Base):
    def post(self, queue: str, task: str) -> None:
        if self.needs_confirmation(f"Delete task {task} from {queue}?", f"{PREFIX}/queues/{queue}"):
            return
        admin.delete_task(queue, task, self.actor)
        self.done(f"Task {task} deleted.", f"{PREFIX}/queues/{queue}")


# -- audit, sweeper, csrf, static -----------------------------------------------------


class AuditPage(_Base):
    def get(self) -> None:
        page = admin.list_audit(cursor=self.request.GET.get("cursor"), limit=self.limit())
        if self.json_api:
            self.send_json(
                {
                    "items": [admin.audit_json(e) for e in page.items],
                    "next_cursor": page.next_cursor,
                }
            )
            return
        self.render("audit.html", title="Audit log", page=page)


class SweepNow(_Base):
    def post(self) -> None:
        report = admin.run_sweeper(self.actor)
        summary = ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in report.items())
        self.done(f"Sweeper ran. {summary}", PREFIX, {"report": report})


class CronSweep(_Base):
    """GET by App Engine cron (or an admin): runs the sweeper once."""

    json_api = True

    def _authenticate(self) -> _admin_auth.Admin | None:
        if _admin_auth.is_cron(self.request.environ):
            return _admin_auth.Admin("cron", "cron")
        return super()._authenticate()

    def get(self) -> None:
        self.send_json({"ok": True, "report": admin.run_sweeper(self.actor, audit_idle=False)})


class CsrfToken(_Base):
    """GET /api/csrf: the token for API scripts (the cookie comes with the response)."""

    json_api = True

    def get(self) -> None:
        self.send_json({"csrf_token": self.csrf_token, "header": _admin_csrf.HEADER})


class NotFoundPage(_Base):
    def get(self, rest: str) -> None:
        self.fail(404, "No such page.")

    post = get


class StaticFile(webapp2.RequestHandler):
    """The dashboard's CSS/SVG, for stacks without app.yaml's static_dir (no secrets here)."""

    def get(self, name: str) -> None:
        self.response.headers.update(SECURITY_HEADERS)
        path = os.path.join(STATIC_DIR, name)
        if not _STATIC_NAME.match(name) or not os.path.isfile(path):
            self.response.status_int = 404
            self.response.content_type = "text/plain"
            self.response.write("not found\n")
            return
        with open(path, "rb") as static:
            self.response.body = static.read()
        self.response.content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self.response.headers["Cache-Control"] = "public, max-age=300"


_ID = r"<{name}:[^/]+>"


def admin_routes() -> list[webapp2.Route]:
    """Every dashboard route: HTML under /_ah/deferred-admin, JSON under .../api/."""
    pages: list[tuple[str, type[_Base]]] = [
        ("", OverviewPage),
        ("/spillover", SpilloverList),
        ("/spillover/bulk", SpilloverBulk),
        (f"/spillover/{_ID.format(name='payload_id')}", SpilloverDetail),
        (f"/spillover/{_ID.format(name='payload_id')}/retrigger", SpilloverRetrigger),
        (f"/spillover/{_ID.format(name='payload_id')}/delete", SpilloverDelete),
        ("/failures", FailureGroups),
        ("/failures/groups", FailureGroups),
        ("/failures/list", FailureList),
        ("/failures/bulk", FailureBulk),
        ("/failures/retry-group", FailureRetryGroup),
        (f"/failures/{_ID.format(name='failure_id')}", FailureDetail),
        (f"/failures/{_ID.format(name='failure_id')}/retrigger", FailureRetrigger),
        (f"/failures/{_ID.format(name='failure_id')}/dismiss", FailureDismiss),
        (f"/failures/{_ID.format(name='failure_id')}/delete", FailureDelete),
        ("/queues", QueueList),
        (f"/queues/{_ID.format(name='queue')}", QueueTasks),
        (f"/queues/{_ID.format(name='queue')}/tasks", QueueTasks),
        (f"/queues/{_ID.format(name='queue')}/pause", QueuePause),
        (f"/queues/{_ID.format(name='queue')}/resume", QueueResume),
        (f"/queues/{_ID.format(name='queue')}/purge", QueuePurge),
        (f"/queues/{_ID.format(name='queue')}/tasks/{_ID.format(name='task')}/run", TaskRun),
        (
            f"/queues/{_ID.format(name='queue')}/tasks/{_ID.format(name='task')}/delete",
            TaskDelete,
        ),
        ("/audit", AuditPage),
        ("/sweep", SweepNow),
    ]
    routes = [webapp2.Route(f"{PREFIX}/", OverviewPage)]
    # DESIGN.md: GET api/failures lists failures; the HTML page of that path shows groups.
    routes.append(webapp2.Route(f"{PREFIX}/api/failures", _api(FailureList)))
    for path, handler in pages:
        routes.append(webapp2.Route(f"{PREFIX}{path}", handler))
        routes.append(webapp2.Route(f"{PREFIX}/api{path or '/overview'}", _api(handler)))
    routes += [
        webapp2.Route(f"{PREFIX}/api/csrf", CsrfToken),
        webapp2.Route(f"{PREFIX}/cron/sweep", CronSweep),
        webapp2.Route(f"{PREFIX}/static/<name:[^/]+>", StaticFile),
        webapp2.Route(f"{PREFIX}/<rest:.*>", NotFoundPage),
    ]
    return routes
