"""The dashboard's route table: every page and action under /_ah/deferred-admin, each with its
JSON twin under .../api/, matched as one webapp2 route."""

from __future__ import annotations

import re
from typing import Any

import webapp2

from .. import _admin_guard as guard
from .base import PREFIX, AdminHandler, api_twin
from .views.api import CsrfToken, StatusApi
from .views.audit import AuditPage
from .views.failures import (
    FailureBulk,
    FailureBulkMatching,
    FailureDelete,
    FailureDetail,
    FailureDismiss,
    FailureGroups,
    FailureList,
    FailureRetrigger,
    FailureRetryGroup,
)
from .views.jobs import JobAction, JobDetail, JobList
from .views.metrics import MetricsPage, MetricsProm
from .views.overview import OverviewPage, RefusedPage
from .views.queues import QueueAction, QueueList, QueueTasks
from .views.spillover import (
    SpilloverBulk,
    SpilloverBulkMatching,
    SpilloverDelete,
    SpilloverDetail,
    SpilloverList,
    SpilloverRetrigger,
)
from .views.static import StaticFile
from .views.sweeper import CronSweep, SweepNow
from .views.tasks import TaskDelete, TaskDetail, TaskRun


class NotFoundPage(AdminHandler):
    def get(self, rest: str = "") -> None:
        self.fail(404, "No such page.")

    post = get


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
    pages: list[tuple[str, type[AdminHandler]]] = [
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
        (f"/queues/{queue}/{QueueAction.verb_pattern()}", QueueAction),
        (f"/queues/{queue}/tasks/{task}", TaskDetail),
        (f"/queues/{queue}/tasks/{task}/run", TaskRun),
        (f"/queues/{queue}/tasks/{task}/delete", TaskDelete),
        ("/metrics", MetricsPage),
        ("/jobs", JobList),
        (f"/jobs/{job}", JobDetail),
        (f"/jobs/{job}/{JobAction.verb_pattern()}", JobAction),
        ("/audit", AuditPage),
        ("/refused", RefusedPage),
        ("/sweep", SweepNow),
    ]
    routes: list[webapp2.BaseRoute] = [_Route("/", OverviewPage)]
    # docs/design.md: GET api/failures lists failures; the HTML page of that path shows groups.
    routes.append(_Route("/api/failures", api_twin(FailureList)))
    for path, handler in pages:
        routes.append(_Route(path, handler))
        routes.append(_Route(f"/api{path or '/overview'}", api_twin(handler)))
    routes += [
        _Route(r"/metrics\.prom", MetricsProm),
        _Route("/api/csrf", CsrfToken),
        _Route("/api/status", StatusApi),
        _Route("/cron/sweep", CronSweep),
        _Route(f"/static/(?P<name>{_SEGMENT})", StaticFile),
    ]
    return [_Dashboard(routes)]
