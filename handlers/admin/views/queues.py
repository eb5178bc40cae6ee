"""/queues: the queues, the tasks of one, and pause / resume / purge."""

from __future__ import annotations

from typing import ClassVar

from gae_deferred import admin

from ..base import AdminHandler
from ._actions import OneVerb


class QueueList(AdminHandler):
    def get(self) -> None:
        queues = [admin.queue_json(queue) for queue in admin.queue_overview()]
        self.respond("queues.html", {"items": queues}, title="Queues")


class QueueTasks(AdminHandler):
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


class QueueAction(OneVerb):
    noun = "queue"
    verbs: ClassVar[dict[str, str | None]] = {
        "pause": None,
        "resume": None,
        "purge": "Purge queue {name}? Every task waiting in it is deleted.",
    }

    def post(self, queue: str, verb: str) -> None:
        self.act(queue, admin.check_queue_name(admin.id_from_url(queue)), verb)
