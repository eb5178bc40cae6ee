"""POST /_ah/queue/deferred[/<dotted.function>]: runs deferred tasks.

The handler only parses the request; gae_deferred.execute_task decides everything else and
returns the status from DESIGN.md's table (403 forged or not from the queue, 200 done or failed
for good, 408 SingularTaskFailure, 500 retry).
"""

from __future__ import annotations

import webapp2

from gae_deferred import TaskInfo, execute_task

#: Cloud Tasks caps App Engine tasks at 100 KB (HTTP targets at 1 MB); anything bigger is forged.
MAX_BODY_BYTES = 1024 * 1024


class DeferredTaskHandler(webapp2.RequestHandler):
    """Executes one task; the optional path suffix only names the function for the logs."""

    def post(self, function: str | None = None) -> None:
        task = TaskInfo.from_environ(self.request.environ)
        length = self.request.content_length
        if task is not None and length is not None and length > MAX_BODY_BYTES:
            self._answer(413, f"body of {length} bytes is larger than any task")
            return
        outcome = execute_task(self.request.body, task)
        self._answer(outcome.status, outcome.result)

    def _answer(self, status: int, text: str) -> None:
        self.response.status_int = status
        self.response.content_type = "text/plain"
        self.response.write(text + "\n")


def task_routes() -> list[webapp2.Route]:
    return [
        webapp2.Route("/_ah/queue/deferred", DeferredTaskHandler, methods=["POST"]),
        webapp2.Route(
            r"/_ah/queue/deferred/<function:[^/]+>", DeferredTaskHandler, methods=["POST"]
        ),
    ]
