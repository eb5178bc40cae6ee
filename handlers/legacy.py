"""``deferred.TaskHandler``: the legacy webapp2 handler class, for apps that subclass it.

Legacy apps overrode ``post()`` or ``run_from_request()`` to add work around every task::

    import gae_deferred as deferred

    class NamespacedTaskHandler(deferred.TaskHandler):
        def run_from_request(self):
            with tenant_namespace(self.request.headers["X-Tenant"]):
                super().run_from_request()

    app = webapp2.WSGIApplication([(r"/_ah/queue/deferred(?:/.*)?", NamespacedTaskHandler)])

Task URLs end in the function's name (``/_ah/queue/deferred/reports.build``), so the route must
match the path and everything below it.
"""

from __future__ import annotations

from typing import Any

from gae_deferred.errors import PermanentTaskFailure, SingularTaskFailure, TaskFailed
from gae_deferred.legacy import answer_for, execute_request, raise_for_failure

from .deferred_task import DeferredTaskHandler


class TaskHandler(DeferredTaskHandler):
    """Runs deferred tasks with the legacy split: ``run_from_request()`` runs the task and raises
    what legacy raised when it fails (SingularTaskFailure, PermanentTaskFailure, or TaskFailed for
    any other exception), and ``post()`` turns that into the answer (408, 200, 500).

    The failure is logged and recorded before ``run_from_request()`` raises, as it is for
    :class:`DeferredTaskHandler`; an override that catches the exception decides the answer.
    """

    def post(self, *args: Any, **kwargs: Any) -> None:
        try:
            self.run_from_request()
        except (PermanentTaskFailure, SingularTaskFailure, TaskFailed) as exc:
            status, text = answer_for(exc)
            self._respond(status, text)

    def run_from_request(self) -> None:
        """Run this request's task; answer 200, or 403/413 for a request that is not a task."""
        outcome = execute_request(self.request.environ, lambda: self.request.body)
        raise_for_failure(outcome)
        self._respond(outcome.status, outcome.result)

    def _respond(self, status: int, text: str) -> None:
        self.response.status_int = status
        self.response.content_type = "text/plain"
        self.response.write(text + "\n")
