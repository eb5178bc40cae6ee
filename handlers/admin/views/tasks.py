"""/queues/<queue>/tasks/<task>: one queued task, run now or deleted."""

from __future__ import annotations

from gae_deferred import admin

from ..base import PREFIX, AdminHandler


class TaskDetail(AdminHandler):
    def get(self, queue: str, task: str) -> None:
        data = admin.task_detail(admin.id_from_url(queue), admin.id_from_url(task))
        self.respond("task_detail.html", data, title=f"Task {data['name']}")


class TaskRun(AdminHandler):
    def post(self, queue: str, task: str) -> None:
        name = admin.id_from_url(task)
        admin.run_task(admin.id_from_url(queue), name, self.actor)
        self.finish(
            f"Task {name} dispatched now.",
            f"{PREFIX}/queues/{queue}",
            links=[(f"queue {admin.id_from_url(queue)}", f"{PREFIX}/queues/{queue}")],
        )


class TaskDelete(AdminHandler):
    def post(self, queue: str, task: str) -> None:
        queue_name, name = admin.id_from_url(queue), admin.id_from_url(task)
        back = f"{PREFIX}/queues/{queue}"
        if self.needs_confirmation(
            f"Delete task {name} from {queue_name}?", back, "Delete 1 task", danger=True
        ):
            return
        admin.delete_task(queue_name, name, self.actor)
        self.finish(f"Task {name} deleted.", back)
